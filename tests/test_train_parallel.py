"""Data parallel (2 gloo processes) and gradient accumulation equal one larger batch."""

from __future__ import annotations

import re

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_helpers import REPO, data, base_args, train_in_process, losses  # noqa: F401 (data: a fixture)


# SGD (Nesterov) rather than AdamW in these comparisons: the update is linear in the gradient, so summation-order
# noise stays at ~1e-6 relative. Adam's m/sqrt(v) amplifies it on near-zero gradient elements, by an amount that
# depends on the noise draw (seeded by the images' absolute paths, so by pytest's tmp folder): 2e-5 to 2e-3 seen.
SGD = ("--optimizer_type", "SGDNesterov", "--learning_rate", "0.5")


def _launch_two(argv: list[str], port: int) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of the trainer on the CPU (gloo)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*launcher, str(REPO / "flux_train_network.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_gloo_processes_match_one_process_at_twice_the_batch(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    def args(out: Path, batch: int) -> list[str]:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--train_batch_size", str(batch),
                      "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", *SGD)
        a[a.index("--dataset_config") + 1] = str(data / "dog.toml")
        return a

    one, two = tmp_path / "one", tmp_path / "two"
    proc = _launch_two(args(two, 1), 29517)
    assert proc.stdout.count("full configuration:") == 1  # only rank 0 prints and writes
    assert len(list((data / "pair" / ".flux_cache").rglob("*.safetensors"))) >= 2  # both ranks' shares cached
    train_in_process(args(one, 2))  # one process, twice the batch, reading the same disk caches
    a, b = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:  # relative error per tensor
        if a[k].norm() > 0:
            worst = max(worst, float((b[k] - a[k]).norm() / a[k].norm()))
    assert worst < 1e-5, worst
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # the LoRA did train
    la, lb = losses(one), losses(two)  # the logged loss is the global batch's (averaged over the ranks)
    assert lb == pytest.approx(la, rel=1e-4)


def test_gradient_accumulation_equals_the_larger_batch(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    def run(out: Path, batch: int, accum: int) -> dict:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--train_batch_size", str(batch),
                      "--gradient_accumulation_steps", str(accum), *SGD)
        a[a.index("--dataset_config") + 1] = str(data / "dog.toml")
        train_in_process(a)
        return load_file(str(out / "lora.safetensors"))

    big, accumulated = run(tmp_path / "big", 2, 1), run(tmp_path / "acc", 1, 2)
    for k in big:
        if big[k].norm() > 0:
            assert float((accumulated[k] - big[k]).norm() / big[k].norm()) < 1e-5, k
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-4)


@pytest.mark.slow
def test_two_processes_accumulating_from_memory_caches_then_resumed_by_one(tiny_ckpts, data: Path,
                                                                            tmp_path: Path, capsys) -> None:
    """2 gloo ranks x batch 1 x accumulation 2, caches in memory (each rank encodes half, then they gather)
    == 1 process x batch 2 x accumulation 2; only rank 0 writes; its state resumes in 1 process with a note."""
    tomls = {}
    for b in (1, 2):
        tomls[b] = tmp_path / f"b{b}.toml"
        tomls[b].write_text((data / "data.toml").read_text().replace("batch_size = 2", f"batch_size = {b}"))

    def args(out: Path, batch: int, *extra: str) -> list[str]:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "4", "--gradient_accumulation_steps", "2",
                      "--save_every_n_steps", "2", "--save_state", "--sample_prompts", str(data / "prompts.txt"),
                      "--sample_every_n_steps", "2", *SGD, *extra)
        a[a.index("--dataset_config") + 1] = str(tomls[batch])
        return a

    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    proc = _launch_two(args(two, 1), 29519)
    err = proc.stderr
    # 4 images: each rank encoded its half of the latents and of the caption variants, and reads them all
    assert "rank 0/2: latents cache: encoded 2 here, 4 entries readable" in err
    assert "rank 1/2: latents cache: encoded 2 here, 4 entries readable" in err
    text = [line for line in err.splitlines() if ": text cache: encoded" in line]
    assert len(text) == 2 and sum(int(line.split("encoded ")[1].split()[0]) for line in text) == \
        int(text[0].split(", ")[-1].split()[0])  # every caption variant encoded once over both ranks
    # only rank 0 writes: each file is announced once, and nothing half-written is left
    for name in ("lora-step00000002.safetensors", "lora.safetensors"):
        assert len(re.findall(rf"saved {re.escape(str(two / name))}( and \S+)?\n", err)) == 1 and (two / name).exists()
    assert err.count("wrote 2 sample image(s)") == 2 and err.count("loss plot:") == 1
    assert not list(two.glob(".*tmp*"))
    assert len(list((two / "sample").glob("*.png"))) == 4

    train_in_process(args(one, 2))  # the reference: 1 process, twice the batch, the same accumulation
    la, lb = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    for k in la:
        if la[k].norm() > 0:
            assert float((lb[k] - la[k]).norm() / la[k].norm()) < 1e-4, k  # caches encoded in other batches
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)

    capsys.readouterr()
    train_in_process(args(resumed, 1, "--resume", str(two / "lora-step00000002-state")))
    note = capsys.readouterr().err
    assert "this state was written by 2 processes and this run has 1" in note and "not bit for bit" in note
    assert [int(line.split(",")[0]) for line in (resumed / "lora_loss.csv").read_text().splitlines()[1:]] == \
        [1, 2, 3, 4]  # the loss history of the 2-process run continues
    assert (resumed / "lora.safetensors").exists()
