"""Saving, exact resume, SIGTERM and NaN handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from train_helpers import REPO, data, base_args, train_in_process, losses  # noqa: F401 (data: a fixture)


def _state_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith("-state"))


def test_resume_after_step_k_equals_the_uninterrupted_run(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    common = ("--max_train_steps", "6", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
              "--gradient_accumulation_steps", "1")
    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process(base_args(tiny_ckpts, data, a, *common, "--save_every_n_steps", "3", "--save_state"))
    assert _state_names(a) == ["lora-state", "lora-step00000003-state"]
    train_in_process(base_args(tiny_ckpts, data, b, *common, "--resume", str(a / "lora-step00000003-state")))
    full, resumed = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k  # bit for bit
    step3 = load_file(str(a / "lora-step00000003.safetensors"))
    assert any(not torch.equal(step3[k], full[k]) for k in full)  # the last 3 steps did change the LoRA
    assert losses(b)[:3] == losses(a)[:3] and losses(b)[3:] == losses(a)[3:]


def test_sigterm_saves_a_loadable_state_and_lora(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "flux_train_network.py"),
                             *base_args(tiny_ckpts, data, out, "--max_train_steps", "10000")],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until the loop runs
        if "start training" in line or time.time() > deadline:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert "continue with --resume" in rest
    states = _state_names(out)
    assert len(states) == 1 and states[0].startswith("lora-step")
    from library.train.checkpoint import load_state

    state = load_state(out / states[0])
    step = state.train_state["global_step"]
    assert step >= 1 and (out / f"lora-step{step:08d}.safetensors").is_file()
    lora = load_file(str(out / f"lora-step{step:08d}.safetensors"))
    assert torch.equal(lora["lora_unet_single_blocks_1_linear2.lora_up.weight"],
                       state.network["lora_unet_single_blocks_1_linear2.lora_up.weight"])


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_file(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "flux_train_network.py"),
                           *base_args(tiny_ckpts, data, out, "--max_train_steps", "50", "--learning_rate", "1e30",
                                      "--optimizer_type", "SGDNesterov", "--max_grad_norm", "0",
                                      "--save_every_n_steps", "1", "--save_last_n_steps", "1")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    msg = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(msg) == 1 and "training stopped: the loss is" in msg[0] and "Traceback" not in proc.stderr
    assert not (out / "lora.safetensors").exists()
    kept = sorted(p.name for p in out.glob("lora-step*.safetensors"))
    assert kept and kept[-1] in msg[0]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / kept[-1])).values())
