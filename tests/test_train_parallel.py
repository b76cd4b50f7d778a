"""Data parallel (2 gloo processes) and gradient accumulation equal one larger batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_helpers import REPO, data, base_args, train_in_process, losses  # noqa: F401 (data: a fixture)


def test_two_gloo_processes_match_one_process_at_twice_the_batch(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    def args(out: Path, batch: int) -> list[str]:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--train_batch_size", str(batch),
                      "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
        a[a.index("--dataset_config") + 1] = str(data / "dog.toml")
        return a

    one, two = tmp_path / "one", tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29517"]
    proc = subprocess.run([*launcher, str(REPO / "flux_train_network.py"), *args(two, 1)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("full configuration:") == 1  # only rank 0 prints and writes
    assert len(list((data / "pair" / ".flux_cache").rglob("*.safetensors"))) >= 2  # both ranks' shares cached
    train_in_process(args(one, 2))  # one process, twice the batch, reading the same disk caches
    a, b = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:  # relative error per tensor: Adam's m/sqrt(v) amplifies summation-order noise in tiny gradients
        if a[k].norm() > 0:
            worst = max(worst, float((b[k] - a[k]).norm() / a[k].norm()))
    assert worst < 1e-3, worst
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # the LoRA did train
    la, lb = losses(one), losses(two)  # the logged loss is the global batch's (averaged over the ranks)
    assert lb == pytest.approx(la, rel=1e-4)


def test_gradient_accumulation_equals_the_larger_batch(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    def run(out: Path, batch: int, accum: int) -> dict:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--train_batch_size", str(batch),
                      "--gradient_accumulation_steps", str(accum))
        a[a.index("--dataset_config") + 1] = str(data / "dog.toml")
        train_in_process(a)
        return load_file(str(out / "lora.safetensors"))

    big, accumulated = run(tmp_path / "big", 2, 1), run(tmp_path / "acc", 1, 2)
    for k in big:
        if big[k].norm() > 0:
            assert float((accumulated[k] - big[k]).norm() / big[k].norm()) < 1e-3, k
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-4)
