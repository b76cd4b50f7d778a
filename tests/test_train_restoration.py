"""A restoration LoRA trains end to end: a degradation dataset (no control folder) with the Kontext objective
(the degraded image as reference tokens) lowers the training loss, and a resumed run equals the uninterrupted
one bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import base_args, data, losses, train_in_process  # noqa: F401 (data: a fixture)


@pytest.mark.slow
def test_restoration_pairs_lower_the_loss(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    toml = tmp_path / "restore.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\n'
                    f'image_dir = "{data / "dog"}"\nclass_tokens = "restore this photo"\nflip_aug = true\n'
                    '[datasets.subsets.degradation]\nops = ["downsample", "blur", "noise", "jpeg"]\n'
                    'downsample = [2, 4]\nnoise_sigma = [0.02, 0.05]\nvariants = 2\n')
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "24", "--learning_rate", "5e-3")
    argv[argv.index("--dataset_config") + 1] = str(toml)
    train_in_process(argv)
    got = losses(out)
    assert len(got) == 24
    first, last = sum(got[:4]) / 4, sum(got[-6:]) / 6
    assert last < 0.7 * first, (first, last, got)
    sd = load_file(str(out / "lora.safetensors"))
    assert any(v.abs().max() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.slow
def test_restoration_resume_equals_the_uninterrupted_run_live_encoding(tiny_ckpts, data: Path,
                                                                      tmp_path: Path) -> None:
    """Without a latent cache the control images are degraded at batch time; a resume sees the same pairs."""
    toml = tmp_path / "restore.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\n'
                    f'image_dir = "{data / "dog"}"\nclass_tokens = "restore"\nflip_aug = true\n'
                    '[datasets.subsets.degradation]\nops = ["downsample", "noise", "scratches"]\nvariants = 2\n')

    def args(out: Path, *extra: str) -> list[str]:
        argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "4", *extra)
        argv[argv.index("--dataset_config") + 1] = str(toml)
        argv.remove("--cache_latents")
        return argv

    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process(args(a, "--save_every_n_steps", "2", "--save_state"))
    train_in_process(args(b, "--resume", str(a / "lora-step00000002-state")))
    full, resumed = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert len(losses(a)) == 4 and losses(b) == losses(a)
    step2 = load_file(str(a / "lora-step00000002.safetensors"))
    assert any(not torch.equal(step2[k], full[k]) for k in full)  # the resumed steps did change the LoRA
