"""Shared fixtures of the evaluation tests: tiny random CLIP / DINOv2 folders and small real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "dataset_configs" / "data" / "dreambooth_dog").glob("*.jpg")) + \
    [REPO / "dataset_configs" / "data" / "clip_skimage_captioned" / n for n in
     ("chelsea.png", "coffee.png", "horse.png", "rocket.jpg")]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from library.eval.tiny_models import write_tiny_clip

    # seed 7: all four test pairs score above 0, so the parity test is not comparing clamped zeros
    return write_tiny_clip(tmp_path_factory.mktemp("eval_models") / "clip", seed=7)


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    from library.eval.tiny_models import write_tiny_dino

    return write_tiny_dino(tmp_path_factory.mktemp("eval_models") / "dino")


def photo(path: Path, size: int) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB").resize((size, size), Image.BICUBIC)
