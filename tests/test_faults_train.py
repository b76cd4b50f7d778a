"""Fault injection through whole (tiny) training runs: a full disk at a save, non-finite weights, flags out
of range, an output folder inside the dataset, a resume with changed settings."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flux_train_network
from cli_helpers import run_in_process
from library import atomic
from library.errors import UserError
from library.train import checkpoint as C
from library.train import trainer
from library.train.cli import parse_args
from library.train.config import build_config
from train_helpers import REPO, base_args, data, train_in_process  # noqa: F401 (data: a fixture)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if atomic.parse_temporary(p.name) or p.name.startswith(".tmp")]


@pytest.fixture(scope="module")
def trained(tiny_ckpts, data: Path, tmp_path_factory) -> Path:
    """One 2-step run with a state at every step, shared by the cases below (read-only for them)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--save_every_n_steps", "1",
                               "--save_state"))
    return out


def test_a_save_records_the_manifest_and_settings(trained: Path) -> None:
    ts = C.read_train_state(trained / "lora-state")
    assert ts["lora"] == {"file": "lora.safetensors", "sha256": C.file_sha256(trained / "lora.safetensors")}
    assert ts["settings"]["learning_rate"] == 2e-3 and ts["settings"]["optimizer_type"] == "AdamW"
    assert not (trained / ".lock").exists() and _temporaries(trained) == []  # released, nothing left


def test_disk_full_at_the_final_save_keeps_the_last_pair(tiny_ckpts, data: Path, trained: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    out = tmp_path / "out"
    real = atomic._write

    def write(f, chunk):  # the disk fills up while the final LoRA / state is written
        if "lora-state" in f.name or ".lora.safetensors" in f.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, chunk)

    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "1", "--save_state"))
    before = _snapshot(out)
    (out / f".lora-step00000007.safetensors.tmp{_dead_pid()}").write_bytes(b"a killed run's leftover")
    monkeypatch.setattr(atomic, "_write", write)
    with pytest.raises(UserError) as err:
        train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--learning_rate", "5e-3",
                                   "--save_state"))
    monkeypatch.undo()
    msg = str(err.value)
    assert "disk full" in msg and "lora" in msg and "needs" in msg and "\n" not in msg, msg
    after = _snapshot(out)
    for name in ("lora.safetensors", "lora-state/network.safetensors", "lora-state/optimizer.pt",
                 "lora-state/train_state.json"):
        assert after[name] == before[name], name  # the first run's pair, untouched
    assert _temporaries(out) == [] and not (out / ".lock").exists()
    assert C.load_state(out / "lora-state").train_state["global_step"] == 1  # still resumable


def test_non_finite_weights_are_never_written(tiny_ckpts, data: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "older-run.safetensors").write_bytes(b"not this run's")
    real = trainer.optimizer_step

    def poisoned(run) -> None:  # what --learning_rate 1e30 or a nan gradient norm does to the weights
        real(run)
        next(p for p in run.network.parameters() if p.requires_grad).data.fill_(float("nan"))

    monkeypatch.setattr(trainer, "optimizer_step", poisoned)
    with pytest.raises(UserError) as err:
        train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--save_every_n_steps", "1",
                                   "--save_state"))
    msg = str(err.value)
    assert "non-finite" in msg and "at step 1" in msg and "kept from this run: no LoRA yet" in msg, msg
    assert "older-run" not in msg
    assert not list(out.glob("lora*.safetensors")) and not list(out.glob("*-state")) and _temporaries(out) == []


def test_the_kept_list_names_this_runs_saves(tiny_ckpts, data: Path, tmp_path: Path, monkeypatch) -> None:
    out, real, steps = tmp_path / "out", trainer.optimizer_step, []

    def poisoned_at_2(run) -> None:
        real(run)
        steps.append(1)
        if len(steps) == 2:
            next(p for p in run.network.parameters() if p.requires_grad).data.fill_(float("inf"))

    monkeypatch.setattr(trainer, "optimizer_step", poisoned_at_2)
    with pytest.raises(UserError, match=r"at step 2; .*kept from this run: lora-step00000001\.safetensors\)"):
        train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--save_every_n_steps", "1"))
    lora = load_file(str(out / "lora-step00000001.safetensors"))
    assert all(torch.isfinite(t).all() for t in lora.values())


@pytest.mark.parametrize("flags, needle", [
    (["--max_train_epochs", "-1"], "--max_train_epochs must be at least 1 (got -1)"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number (got inf)"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number (got nan)"),
    (["--network_dropout", "1.5"], "--network_dropout must be in [0, 1) (got 1.5)"),
    (["--discrete_flow_shift", "0"], "--discrete_flow_shift must be greater than 0 (got 0.0)"),
    (["--discrete_flow_shift", "-2"], "--discrete_flow_shift must be greater than 0 (got -2.0)"),
    (["--network_dim", "0"], "--network_dim must be in [1, 65536] (got 0)"),
    (["--t5xxl_max_token_length", "100000"], "--t5xxl_max_token_length must be in [1, 512] (got 100000)"),
    (["--max_data_loader_n_workers", "-3"], "--max_data_loader_n_workers must be in [0, 1024] (got -3)"),
    (["--text_encoder_lr", "1e-4", "nan"], "--text_encoder_lr must be a finite number (got nan)"),
])
def test_flags_out_of_range_fail_at_parse_time(flags: list[str], needle: str) -> None:
    with pytest.raises(UserError) as err:
        build_config(parse_args(["--dataset_config", "d.toml", *flags]))
    assert str(err.value) == f"command line: {needle}"


def test_flags_in_range_pass() -> None:  # the control: the edges themselves are accepted
    build_config(parse_args(["--dataset_config", "d.toml", "--max_train_epochs", "1", "--network_dropout", "0",
                             "--discrete_flow_shift", "0.1", "--network_dim", "1", "--t5xxl_max_token_length", "512"]))


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_in_an_image_folder_is_refused(tiny_ckpts, data: Path, where: str, tmp_path: Path) -> None:
    import flux_train_network

    images = data / "dog"
    out = images if where == "same" else images / "runs" / "a"
    before = _snapshot(images)
    with pytest.raises(UserError, match=r"--output_dir .* is inside the image folder .*datasets\[0\]\.subsets\[0\]"
                                        r"\.image_dir"):
        flux_train_network.main(base_args(tiny_ckpts, data, out))
    assert _snapshot(images) == before and not (images / "runs").exists()


def test_resume_with_a_new_learning_rate_warns_and_records_the_rate_used(tiny_ckpts, data: Path, trained: Path,
                                                                         tmp_path: Path, capfd) -> None:
    out = tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--learning_rate", "1e-5",
                               "--network_alpha", "2", "--resume", str(trained / "lora-step00000001-state")))
    text = " ".join(capfd.readouterr().err.split())
    assert "--learning_rate is 1e-05 now, 0.002 in the state; the state's value is used" in text
    assert "--network_alpha is 2.0 now, 4.0 in the state; the new value is used" in text
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_learning_rate"] == "0.002" and md["ss_network_alpha"] == "2.0"
    ts = json.loads((out / "lora_config.json").read_text())
    assert ts["optimizer"]["learning_rate"] == 1e-5  # the config as given is still saved as given


def test_resume_with_another_optimizer_is_one_line_before_models(tiny_ckpts, data: Path, trained: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    import flux_train_network
    from library.train import models

    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(UserError, match="trained with --optimizer_type AdamW, this run asks for SGDNesterov"):
        flux_train_network.main(base_args(tiny_ckpts, data, tmp_path / "out", "--optimizer_type", "SGDNesterov",
                                          "--resume", str(trained / "lora-step00000001-state")))


def test_truncated_state_file_on_the_command_line_is_one_line_exit_2(tiny_ckpts, data: Path, trained: Path,
                                                                     tmp_path: Path) -> None:
    import shutil

    state = tmp_path / "copy-state"
    shutil.copytree(trained / "lora-step00000001-state", state)
    opt = state / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    before = _snapshot(state)
    proc = run_in_process(flux_train_network.main,  # tests/cli_helpers.py
                          base_args(tiny_ckpts, data, tmp_path / "out", "--resume", str(state)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {opt}: --resume: damaged or truncated (RuntimeError); resume from an earlier state, "
                      "or start again without --resume"], proc.stderr
    assert _snapshot(state) == before and not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_saves_and_exits_without_a_traceback(tiny_ckpts, data: Path,
                                                                              tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "out"
    args = base_args(tiny_ckpts, data, out, "--max_train_steps", "100000")
    args[args.index("--dataset_config") + 1] = str(data / "dog.toml")
    proc = subprocess.Popen([sys.executable, "-m", "library.train.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", "29531", str(REPO / "flux_train_network.py"), *args],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    seen, deadline = [], time.time() + 240
    for line in proc.stderr:
        seen.append(line)
        if "start training" in line or time.time() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rest = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=240) == 128 + signal.SIGTERM, rest[-3000:]
    assert "Traceback" not in rest and "SignalException" not in rest, rest[-3000:]
    assert "SIGTERM: the training processes were stopped after saving a state" in rest
    states = [p for p in out.iterdir() if p.name.endswith("-state")]
    assert len(states) == 1 and C.load_state(states[0]).train_state["global_step"] >= 1
    assert not (out / ".lock").exists() and _temporaries(out) == []


_RANK0_FULL = """
import errno, os, sys
sys.path.insert(0, {repo!r})
from library import atomic
if os.environ.get("RANK") == "0":  # the disk fills up on rank 0 only, at the first write of a {what!r} file
    real = atomic._write
    def write(f, data):
        if {what!r} in f.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)
    atomic._write = write
import flux_train_network
from library.errors import run_main
run_main(flux_train_network.main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("what, previous", [("lora-step", "lora-step00000001.safetensors"),
                                            ("sample", "sample/lora_000001_00_a_photo_of_sks_dog.png")])
def test_disk_full_on_rank_0_stops_every_rank_with_its_line(tiny_ckpts, data: Path, tmp_path: Path, what: str,
                                                            previous: str) -> None:
    """Before rank 0 told the others how its write ended, rank 1 waited at the next collective and died with
    gloo's 'Connection closed by peer' traceback when rank 0 exited; the launch ended 1 with torchrun's
    ChildFailedError traceback."""
    out = tmp_path / "out"
    (out / previous).parent.mkdir(parents=True)
    (out / previous).write_bytes(b"the user's earlier file")
    script = tmp_path / "rank0_full.py"
    script.write_text(_RANK0_FULL.format(repo=str(REPO), what=what))
    args = base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state",
                     "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "1")
    args[args.index("--dataset_config") + 1] = str(data / "dog.toml")
    port = 29541 if what == "sample" else 29543
    proc = subprocess.run([sys.executable, "-m", "library.train.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), str(script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "disk full" in next(iter(errors)), proc.stderr[-4000:]  # one line, the same
    assert (out / previous).read_bytes() == b"the user's earlier file"  # nothing of the user's replaced
    assert _temporaries(out) == [] and not (out / ".lock").exists()
    assert not list(out.glob("lora-step*-state")) and not (out / "lora.safetensors").exists()  # stopped there


def _older_state(trained: Path, folder: Path, with_lora: bool = True) -> Path:
    """A copy of the step-1 state as an older version wrote it: no 'settings', no manifest."""
    import shutil

    state = folder / "lora-step00000001-state"
    shutil.copytree(trained / state.name, state)
    if with_lora:
        shutil.copy(trained / "lora-step00000001.safetensors", folder)
    ts = json.loads((state / "train_state.json").read_text())
    del ts["settings"], ts["lora"]
    (state / "train_state.json").write_text(json.dumps(ts))
    return state


def test_an_older_state_is_compared_by_its_loras_metadata(tiny_ckpts, data: Path, trained: Path, tmp_path: Path,
                                                          capfd) -> None:
    """Before, a state without 'settings' resumed without any comparison: no warning, no note."""
    state, out = _older_state(trained, tmp_path), tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--learning_rate", "1e-5",
                               "--network_alpha", "2", "--seed", "5", "--resume", str(state)))
    text = " ".join(capfd.readouterr().err.split())
    assert "--learning_rate is 1e-05 now, 0.002 in the state; the state's value is used" in text
    assert "--network_alpha is 2.0 now, 4.0 in the state; the new value is used" in text
    assert "--seed is 5 now, 3 in the state; the new value is used" in text
    assert "--lr_scheduler is" not in text  # unchanged settings are not reported
    assert f"{state}: --resume: this state was written by an older version" in text
    assert "read from the metadata of lora-step00000001.safetensors" in text
    assert "could not be compared: --optimizer_args, --network_args, --train_batch_size, " \
           "--gradient_accumulation_steps, --dataset_config, number of images" in text
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_learning_rate"] == "0.002"  # records the rate the optimizer kept


def test_an_older_state_without_its_lora_is_a_note_of_nothing_compared(trained: Path, tmp_path: Path) -> None:
    from library.train import resume_settings as RS

    state = _older_state(trained, tmp_path, with_lora=False)
    found, note = RS.reconstruct_settings(state, C.read_train_state(state))
    assert found == {} and "no LoRA with kohya metadata beside it: nothing; could not be compared: " \
                                     "--learning_rate, --unet_lr" in note
    with_lora = _older_state(trained, tmp_path / "b")  # the control: the LoRA beside it is read
    found, _ = RS.reconstruct_settings(with_lora, C.read_train_state(with_lora))
    assert found["optimizer_type"] == "AdamW" and found["learning_rate"] == 2e-3 and found["unet_lr"] is None


def test_an_older_state_with_another_optimizer_is_refused_by_its_metadata(tiny_ckpts, data: Path, trained: Path,
                                                                          tmp_path: Path) -> None:
    import flux_train_network

    state = _older_state(trained, tmp_path)
    with pytest.raises(UserError, match="trained with --optimizer_type AdamW, this run asks for Lion"):
        flux_train_network.main(base_args(tiny_ckpts, data, tmp_path / "out", "--optimizer_type", "Lion",
                                          "--resume", str(state)))
