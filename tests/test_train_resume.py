"""Saving, exact resume, SIGTERM and NaN handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


_KILL_AT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from library import atomic
from library.train import checkpoint as C, trainer
kind, n = sys.argv[1], int(sys.argv[2])  # kill -9 at the n-th event of this kind ("none": run to the end)
count = {{"step": 0, "write": 0, "rename": 0, "fsync": 0}}
def at(what, real):
    def wrapped(*a, **k):
        count[what] += 1
        if what == kind and count[what] == n:
            os.kill(os.getpid(), signal.SIGKILL)  # no finally, no clean-up, no flush
        return real(*a, **k)
    return wrapped
trainer.forward_backward = at("step", trainer.forward_backward)  # between optimizer steps
atomic._write = at("write", atomic._write)  # inside a save (LoRA, state files), a config or the plot
C._rename = at("rename", C._rename)  # between the renames of a save
os.fsync = at("fsync", os.fsync)
import flux_train_network
from library.errors import run_main
sys.argv[1:] = sys.argv[3:]
run_main(flux_train_network.main)
"""


@pytest.mark.slow
def test_kill_9_at_seeded_moments_then_resume_equals_the_uninterrupted_run(tiny_ckpts, data: Path,
                                                                           tmp_path: Path) -> None:
    """kill -9 at seeded moments (mid-step, inside a save's writes, between its renames, at a flush); after each
    kill every visible LoRA and state loads; each restart resumes from the newest complete state (a hidden
    complete copy included), clears the dead run's temporaries, and the chain ends with the uninterrupted
    run's LoRA bit for bit. It fails if a save publishes before its data is complete (a visible file does not
    load), if the start-up clean-up misses or deletes a dead run's save, or if a resume is not exact."""
    import random

    from library import atomic
    from library.train import checkpoint as C

    common = ("--max_train_steps", "4", "--save_every_n_steps", "1", "--save_state")
    ref, out = tmp_path / "ref", tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, ref, *common))
    script = tmp_path / "kill_at.py"
    script.write_text(_KILL_AT.format(repo=str(REPO)))
    rng = random.Random(16)  # mid step 3; at the 4th rename (the final LoRA's, its state already swapped in);
    limits = {"step": 4, "write": 60, "rename": 6, "fsync": 12}  # at the 15th write (inside a save)
    moments = [(kind, rng.randint(1, limits[kind])) for kind in rng.sample(sorted(limits), 3)] + [("none", 0)]

    def newest_state() -> list[str]:
        names = {p.name for p in out.glob("*-state")} if out.is_dir() else set()
        names |= {atomic.parse_temporary(p.name)[0] for p in out.glob(".*-state.*")
                  if atomic.parse_temporary(p.name) and C.is_complete_state(p)} if out.is_dir() else set()
        steps = {name: C.load_state(out / name).train_state["global_step"] for name in names}
        return ["--resume", str(out / max(steps, key=steps.get))] if steps else []

    leftovers: set[str] = set()
    for kind, n in moments:
        proc = subprocess.run([sys.executable, str(script), kind, str(n), *base_args(tiny_ckpts, data, out, *common),
                               *newest_state()], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        assert proc.returncode == (0 if kind == "none" else -signal.SIGKILL), (kind, n, proc.stderr[-3000:])
        assert not leftovers & {p.name for p in out.iterdir()}, (kind, n)  # the dead run's: put back or removed
        for p in out.glob("*.safetensors"):  # visible files are complete
            load_file(str(p))
        for p in out.glob("*-state"):
            C.load_state(p)
        leftovers = {p.name for p in out.iterdir() if atomic.parse_temporary(p.name)}
    assert leftovers == set() and not (out / ".lock").exists()
    full, chained = load_file(str(ref / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert full.keys() == chained.keys() and all(torch.equal(full[k], chained[k]) for k in full)
