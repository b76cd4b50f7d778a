"""flux_minimal_inference.py --lora_weights: the same image merged or applied on the fly (PSNR >= 40 dB)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_minimal_inference
from library.flux.loading import load_transformer
from library.flux.text_encoders import load_clip_l
from networks.lora_flux import create_network
from tests.interop.helpers import randomize_network

BAR = 40.0


def psnr(a: Path, b: Path) -> float:
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def loras(tiny_ckpts, tmp_path_factory) -> list[Path]:
    """Two LoRAs for the tiny checkpoints (one split_qkv, one touching CLIP-L), random non-zero ups."""
    out = tmp_path_factory.mktemp("inference_loras")
    transformer = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    clip = load_clip_l(tiny_ckpts.clip_l, "cpu", torch.float32)
    paths = []
    for i, (args, te) in enumerate([({"split_qkv": "True"}, None), ({}, clip)]):
        net = create_network(1.0, 4, 4, transformer, te, None, **args)
        randomize_network(net, seed=20 + i, std=0.2)
        paths.append(out / f"l{i}.safetensors")
        net.save_weights(paths[-1], torch.bfloat16, {})
    return paths


def run(ck, out: Path, name: str, loras: list[str], merge: bool, dtype: str = "float32") -> Path:
    argv = ["--ckpt_path", str(ck.transformer), "--clip_l", str(ck.clip_l), "--t5xxl", str(ck.t5xxl), "--ae",
            str(ck.ae), "--prompt", "a photo of sks dog", "--width", "64", "--height", "48", "--steps", "3",
            "--seed", "3", "--dtype", dtype, "--device", "cpu", "--output_dir", str(out), "--output_name", name]
    if loras:
        argv += ["--lora_weights", *loras] + (["--merge_lora_weights"] if merge else [])
    assert flux_minimal_inference.main(argv) == 0
    return out / f"{name}.png"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_equals_on_the_fly(tiny_ckpts, loras, tmp_path, dtype):
    spec = [f"{loras[0]};0.8", f"{loras[1]};-0.6"]
    merged = run(tiny_ckpts, tmp_path, "merged", spec, True, dtype)
    fly = run(tiny_ckpts, tmp_path, "fly", spec, False, dtype)
    assert psnr(merged, fly) >= BAR
    if dtype == "float32":  # and the LoRAs do change the image (the comparison can fail)
        base = run(tiny_ckpts, tmp_path, "base", [], False, dtype)
        assert psnr(base, fly) < 30
        half = run(tiny_ckpts, tmp_path, "half", [f"{loras[0]};0.4", f"{loras[1]};-0.6"], False, dtype)
        assert psnr(half, fly) < BAR
