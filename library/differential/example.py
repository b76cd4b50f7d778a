"""The tiny colour-grade example of docs/differential.md: "after" = shipped photos with a fixed warm grade,
"before" = the same photos unchanged. A differential LoRA trained on these pairs should learn the grade only
(warmer: more red, less blue), not the photos' content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.differential.render import RenderModels, RenderSettings, render
from library.differential.run import run_differential
from library.differential.stages import DifferentialOptions
from library.flux.loading import load_autoencoder
from library.train.cli import parse_args
from library.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "dataset_configs" / "data" / "clip_skimage_captioned"
NAMES = ("chelsea.png", "coffee.png", "horse.png", "rocket.jpg")
CAPTION = "a photo"


def colour_grade(rgb: np.ndarray) -> np.ndarray:
    """The fixed warm grade on uint8 RGB [H, W, 3]: red x1.3 + 50, green unchanged, blue x0.5."""
    x = rgb.astype(np.float32)
    x[..., 0] = x[..., 0] * 1.3 + 50
    x[..., 2] = x[..., 2] * 0.5
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
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        return ae.encode(x)[0]


def grade_axis(ae_path: Path, pairs_root: Path, resolution: int = 32):
    """The grade's direction in the AE's latent space: (mean latent of the befores, mean(after) - mean(before)),
    per channel, over the pair images resized to the training resolution.

    The tiny test AE has random weights, so its decoder does not preserve colour (a decoded image's warmth is
    about the same for graded and plain inputs); the grade is therefore read where the model works, in the
    latents the AE gives the graded and the plain photos."""
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


# ---------------------------------------------------------------------------------- the end-to-end example

def _argv(ckpts, toml: Path, out: Path, steps: int, lr: float, seed: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpts.transformer), "--clip_l", str(ckpts.clip_l),
            "--t5xxl", str(ckpts.t5xxl), "--ae", str(ckpts.ae), "--dataset_config", str(toml),
            "--output_dir", str(out), "--output_name", "grade", "--network_dim", "4", "--network_alpha", "4",
            "--network_train_unet_only", "--learning_rate", str(lr), "--seed", str(seed),
            "--model_prediction_type", "raw", "--cache_latents", "--cache_text_encoder_outputs",
            "--t5xxl_max_token_length", "16", "--max_data_loader_n_workers", "0", "--max_train_steps", str(steps),
            "--console_log_level", "WARNING"]


def train_grade_loras(ckpts, root: Path, swap: bool, seed: int, steps: int = 12, stage1_steps: int = 8,
                      lr: float = 2e-3, stage1_lr: float = 1e-2, stage1_dim: int = 16,
                      names: tuple[str, ...] = NAMES[:2]) -> tuple[Path, Path]:
    """(the differential LoRA of the graded pairs (swap: reversed), its null twin) under root.

    The null twin is stage 2 trained on identical pairs (after := before) on the same stage-1 file, from the
    same folder, so it draws the same noise and timesteps (keyed by seed and image path) and differs from the
    real run only in the after images. The tiny random base cannot fit the befores in a few stage-1 steps; what
    stage 1 leaves unfitted, stage 2 learns too, in both runs alike, and that common part swings the raw shift
    by about +-2 grade units from draw to draw (docs/differential.md); the twin takes it out."""
    toml = write_pairs(root / "pairs", size=64, names=names, swap=swap)
    opts = DifferentialOptions(stage1_max_train_steps=stage1_steps, stage1_learning_rate=stage1_lr,
                               stage1_network_dim=stage1_dim)
    lora = run_differential(parse_args(_argv(ckpts, toml, root / "out", steps, lr, seed)), opts, train)
    for before in sorted((root / "pairs" / "before").glob("*.png")):
        (root / "pairs" / "after" / before.name).write_bytes(before.read_bytes())
    null_opts = DifferentialOptions(stage1_weights=str(root / "out" / "grade_stage1.safetensors"))
    null = run_differential(parse_args(_argv(ckpts, toml, root / "null", steps, lr, seed)), null_opts, train)
    return lora, null


def grade_effect(ckpts, root: Path, lora: Path, null: Path, seeds: tuple[int, ...] = tuple(range(8)),
                 steps: int = 1) -> list[float]:
    """Per sampling seed: grade coordinate of the plain base's sample with `lora` minus the same with `null`,
    on the grade's own axis (plain photos 0 -> graded photos 1, from pairs written under root/axis), so the
    expected sign is + for graded pairs and - for swapped ones. One sampling step: the tiny random model's
    multi-step trajectories leave the region the LoRA was trained on, where its effect has no defined sign;
    the first step starts from pure noise, as training at t ~ 1 does."""
    write_pairs(root / "axis", size=64)
    axis = grade_axis(ckpts.ae, root / "axis")
    models = RenderModels(ckpts.transformer, ckpts.ae, ckpts.clip_l, ckpts.t5xxl)
    settings = RenderSettings(32, 32, steps, 3.5, 16)
    prompts = [CAPTION] * len(seeds)
    real = render(models, prompts, list(seeds), [(lora, 1.0)], settings)
    twin = render(models, prompts, list(seeds), [(null, 1.0)], settings)
    return [grade_coordinate(r.latents, axis) - grade_coordinate(t.latents, axis) for r, t in zip(real, twin)]
