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


def _encode(ae, rgb: np.ndarray):
    import torch  # noqa: PLC0415

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        return ae.encode(x)[0]


def grade_axis(ae_path: Path, pairs_root: Path, resolution: int = 32):
    """The grade's direction in the AE's latent space: (mean latent of the befores, mean(after) - mean(before)),
    per channel, over the pair images resized to the training resolution.

    The tiny test AE has random weights, so its decoder does not preserve colour (a decoded image's warmth is
    about the same for graded and plain inputs); the grade is therefore read where the model works, in the
    latents the AE gives the graded and the plain photos."""
    import torch  # noqa: PLC0415

    from library.flux.loading import load_autoencoder  # noqa: PLC0415

    ae = load_autoencoder(ae_path, "cpu", torch.float32)
    means = {}
    for side in ("before", "after"):
        zs = [_encode(ae, np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution), Image.LANCZOS)))
              for p in sorted((pairs_root / side).glob("*.png"))]
        means[side] = torch.stack([z.mean((1, 2)) for z in zs]).mean(0)
    return means["before"], means["after"] - means["before"]


def grade_coordinate(latents, axis) -> float:
    """Where a latent [16, h, w] lies on the grade's axis: 0 = like the befores, 1 = like the afters."""
    origin, d = axis
    return float(((latents.mean((1, 2)) - origin) @ d) / (d @ d))
