"""The tiny colour-grade example of docs/differential.md: "after" = shipped photos with a fixed warm grade,
"before" = the same photos unchanged. A differential LoRA trained on these pairs should learn the grade only
(warmer: more red, less blue), not the photos' content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "dataset_configs" / "data" / "clip_skimage_captioned"
NAMES = ("chelsea.png", "coffee.png", "horse.png", "rocket.jpg")
CAPTION = "a photo"


def colour_grade(rgb: np.ndarray) -> np.ndarray:
    """The fixed warm grade on uint8 RGB [H, W, 3]: red x1.15 + 30, green unchanged, blue x0.7."""
    x = rgb.astype(np.float32)
    x[..., 0] = x[..., 0] * 1.15 + 30
    x[..., 2] = x[..., 2] * 0.7
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def warmth(rgb: np.ndarray) -> float:
    """The measure of the grade's direction: mean(R) - mean(B) over the image, in [0, 1] units."""
    x = np.asarray(rgb, dtype=np.float64) / 255.0
    return float(x[..., 0].mean() - x[..., 2].mean())


def write_pairs(root: Path, size: int = 64, names: tuple[str, ...] = NAMES, swap: bool = False,
                resolution: int = 32, batch_size: int = 2) -> Path:
    """Square `size` px pairs under root/after and root/before (swap: the grade on the before side), a caption
    per after image, and root/pairs.toml; returns the TOML's path."""
    after, before = root / "after", root / "before"
    after.mkdir(parents=True, exist_ok=True)
    before.mkdir(parents=True, exist_ok=True)
    for name in names:
        with Image.open(PHOTOS / name) as im:
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            plain = np.asarray(im.convert("RGB").crop(box).resize((size, size), Image.LANCZOS))
        graded = colour_grade(plain)
        stem = Path(name).stem
        Image.fromarray(plain if swap else graded).save(after / f"{stem}.png")
        Image.fromarray(graded if swap else plain).save(before / f"{stem}.png")
        (after / f"{stem}.txt").write_text(CAPTION + "\n")
    toml = root / "pairs.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {resolution}\n'
                    f'batch_size = {batch_size}\n[[datasets.subsets]]\nimage_dir = "{after}"\n'
                    f'before_dir = "{before}"\n')
    return toml
