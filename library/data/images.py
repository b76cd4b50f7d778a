"""Reading training images with Pillow: every file becomes an upright 8-bit RGB array (+ optional alpha).

Handled: EXIF orientation (applied before anything else, also to the size used for bucketing), RGBA / LA /
palette transparency (alpha kept for `alpha_mask`), grayscale and 1-bit, CMYK, 16-bit grayscale and
16-bit RGB(A) PNGs, floating-point TIFFs, and files whose extension lies (Pillow sniffs the content).
An unreadable file raises `BadImageError` (a `UserError` naming the file); callers skip it with a warning
under --skip_bad_images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from library.data.schema import IMAGE_EXTENSIONS
from library.errors import UserError

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these rotate by 90 degrees: width and height swap

_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


class BadImageError(UserError):
    """An image file that cannot be decoded; `path` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: cannot read image ({reason}); fix or remove the file, "
                         "or pass --skip_bad_images to skip unreadable images")


    def skipped(self) -> str:
        """The warning under --skip_bad_images (without the advice to pass the flag that is already set)."""
        return f"skipping {self.path}: cannot read image ({self.reason})"


@dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray  # uint8 [H, W, 3], upright
    alpha: np.ndarray | None  # uint8 [H, W] or None when the file has no transparency


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (no recursion, as kohya), sorted by name; hidden files skipped."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    named = [folder / n for n in names if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    found = sorted(p for p in named if p.is_file())
    dangling = len(named) - len(found) - sum(1 for p in named if p.is_dir())
    if dangling:  # broken symbolic links and link loops: said, not silently dropped
        log.warning("%s: %d image name(s) are broken or looping symbolic links and are skipped", folder, dangling)
    return found


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:160]


MAX_SIDE = 32768  # pixels; beyond this (or beyond MAX_ASPECT) resizing to a bucket needs gigabytes
MAX_ASPECT = 64


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only (no pixel decoding); absurd sizes are
    refused here, before a 1.6 KB PNG of 1x400000 pixels is decoded and resized into gigabytes."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            _check_size(path, w, h)  # before getexif, which decodes a PNG whose EXIF follows the pixels
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, _reason(e)) from None
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def _check_size(path: Path, w: int, h: int) -> None:
    if w < 1 or h < 1:
        raise BadImageError(path, f"empty image {w}x{h}")
    if max(w, h) > MAX_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        raise BadImageError(path, f"{w}x{h} pixels: sides above {MAX_SIDE} or an aspect ratio beyond 1:{MAX_ASPECT} "
                                  "are not trainable")


def load_image(path: Path) -> LoadedImage:
    """Decode fully, apply EXIF orientation, convert to 8-bit RGB and keep alpha if the file has any."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncation shows up here, not later in a worker
            img = ImageOps.exif_transpose(img)
            return _to_rgb_alpha(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, _reason(e)) from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgb_alpha(img: Image.Image) -> LoadedImage:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return LoadedImage(_high_depth_to_u8(img), None)
    if img.mode.endswith(";16") or img.mode in ("RGB;16", "RGBA;16"):  # some Pillow builds keep 16-bit RGB
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    if _has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"))
        return LoadedImage(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]))
    # CMYK, YCbCr, LAB, HSV, L, 1, P (no transparency): Pillow's conversions to RGB.
    return LoadedImage(np.asarray(img.convert("RGB")), None)


def _high_depth_to_u8(img: Image.Image) -> np.ndarray:
    """16-bit / 32-bit gray to 8-bit: scale the full 16-bit range, not Pillow's clip at 255."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        peak = 1.0 if arr.max(initial=0.0) <= 1.0 else 65535.0
    elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        peak = 65535.0
    else:
        peak = 255.0
    gray = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def resize_crop(arr: np.ndarray, resized: tuple[int, int], crop_ltrb: tuple[int, int, int, int],
                interpolation: str | None) -> np.ndarray:
    """Resize an [H, W, C] or [H, W] uint8 array to `resized` (W, H), then crop to `crop_ltrb`.

    interpolation None = kohya's default: area when shrinking, lanczos when enlarging.
    """
    h, w = arr.shape[:2]
    if (w, h) != tuple(resized):
        name = interpolation or ("area" if resized[0] * resized[1] < w * h else "lanczos")
        arr = np.asarray(Image.fromarray(arr).resize(tuple(resized), _FILTERS[name]))
    left, top, right, bottom = crop_ltrb
    return np.ascontiguousarray(arr[top:bottom, left:right])
