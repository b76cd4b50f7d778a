"""Hostile values through the prompt options of flux_minimal_inference.py and the trainer's --sample_prompts:
sizes, steps, scales and seeds no image can be made with, a --ci / --control_image file that is not a whole
image, and a LoRA file with a hostile safetensors header or nan tensors. Each is one line naming the prompt
line / flag / file and exit status 2 (the trainer's before anything is written); none is a traceback.

The cases run the entry points' `main` in this process (tests/cli_helpers.py); one trainer case and the
interactive session run as real processes."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import flux_minimal_inference
import flux_train_network
from cli_helpers import one_error, run_in_process
from train_helpers import REPO, base_args, data  # noqa: F401 (data: a fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
LORA_KEY = "lora_unet_double_blocks_0_img_attn_qkv"


def _hostile(path: Path, header: object) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    return path


def _nan_lora(path: Path) -> Path:
    down = torch.zeros(4, 8)
    down[1, 2] = float("nan")
    save_file({f"{LORA_KEY}.lora_down.weight": down, f"{LORA_KEY}.lora_up.weight": torch.zeros(8, 4),
               f"{LORA_KEY}.alpha": torch.tensor(4.0)}, str(path))
    return path


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


# -- the trainer: --sample_prompts lines and --network_weights, refused before anything is written ------------

HOSTILE_LINES = [
    ("a dog --g nan", ":1: guidance (--g) nan must be a finite number"),
    ("a dog --l inf --n blurry", ":1: CFG scale (--l / --c) inf must be a finite number"),
    ("a dog --s 0", ":1: steps (--s) 0 must be in [1, 10000]"),
    ("a dog --s 100000", ":1: steps (--s) 100000 must be in [1, 10000]"),
    ("a dog --w 100000", ":1: width (--w) 100000 must be in [16, 16384] pixels"),
    ("a dog --h -8", ":1: height (--h) -8 must be in [16, 16384] pixels"),
    ("a dog --d 99999999999999999999999", ":1: seed (--d) 99999999999999999999999 is out of range"),
    ("a dog --ci {truncated}", "cannot read image"),
    ("a dog --ci {hostile}", "cannot read image"),
]


def _train_args(tiny_ckpts, data: Path, tmp_path: Path, line: str) -> tuple[list[str], Path, Path]:
    truncated = _truncated_png(tmp_path / "cut.png")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line.format(truncated=truncated, hostile=tmp_path / "fake.png") + "\n")
    out = tmp_path / "out"
    return (base_args(tiny_ckpts, data, out, "--max_train_steps", "1", "--sample_prompts", str(prompts),
                      "--sample_every_n_steps", "1"), prompts, out)


@pytest.mark.parametrize("line, needle", HOSTILE_LINES)
def test_a_hostile_sample_prompt_stops_the_trainer_before_it_writes(tiny_ckpts, data: Path, tmp_path: Path,
                                                                    line: str, needle: str) -> None:
    """Before, these lines were clamped, accepted as nan, or failed at the first sampling (after caching and
    a training step, with the output folder written)."""
    argv, prompts, out = _train_args(tiny_ckpts, data, tmp_path, line)
    error = one_error(run_in_process(flux_train_network.main, argv))
    assert needle in error and (str(prompts) in error or "--ci" in error), error
    assert not out.exists()  # no step taken, nothing written


def test_a_hostile_sample_prompt_in_a_real_trainer_process(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    argv, prompts, out = _train_args(tiny_ckpts, data, tmp_path, HOSTILE_LINES[0][0])
    proc = subprocess.run([sys.executable, str(REPO / "flux_train_network.py"), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=ENV)
    error = one_error(proc)
    assert HOSTILE_LINES[0][1] in error and str(prompts) in error, error
    assert not out.exists()


def test_a_nan_network_weights_file_stops_the_trainer_before_it_writes(tiny_ckpts, data: Path,
                                                                       tmp_path: Path) -> None:
    lora = _nan_lora(tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "1", "--network_weights", str(lora))
    error = one_error(run_in_process(flux_train_network.main, argv))
    assert f"{lora}: tensor '{LORA_KEY}.lora_down.weight' holds nan values" in error
    assert not out.exists()


# -- flux_minimal_inference.py: flags, --control_image, --lora_weights -----------------------------------------

def _inference_args(ck, out: Path, *extra: str) -> list[str]:
    return ["--ckpt_path", str(ck.transformer), "--clip_l", str(ck.clip_l), "--t5xxl", str(ck.t5xxl), "--ae",
            str(ck.ae), "--width", "64", "--height", "64", "--steps", "2", "--dtype", "fp32",
            "--t5xxl_max_token_length", "16", "--output_dir", str(out), *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--steps", "0"], "--steps 0: too small"),
    (["--steps", "100000"], "--steps 100000: too large"),
    (["--width", "100000"], "--width 100000: too large"),
    (["--height", "-8"], "--height -8: too small"),
    (["--lora_weights", "{nan};nan"], "multiplier nan must be a finite number"),
    (["--lora_weights", "{nan}"], "tensor 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight' holds nan values"),
    (["--lora_weights", "{no_offsets}"], "'data_offsets' must be [begin, end], got None"),
    (["--lora_weights", "{list_entry}"], "expected {dtype, shape, data_offsets}, got list"),
    (["--lora_weights", "{bad_dtype}"], "unknown dtype 'Q7'"),
    (["--control_image", "{truncated}"], "cannot read image"),
])
def test_hostile_inference_options_are_one_line(tiny_ckpts, tmp_path: Path, extra: list[str], needle: str) -> None:
    files = {"nan": _nan_lora(tmp_path / "nan.safetensors"), "truncated": _truncated_png(tmp_path / "cut.png"),
             "no_offsets": _hostile(tmp_path / "a.safetensors", {"a": {"dtype": "F32", "shape": [2]}}),
             "list_entry": _hostile(tmp_path / "b.safetensors", {"a": [1, 2]}),
             "bad_dtype": _hostile(tmp_path / "c.safetensors", {"a": {"dtype": "Q7", "shape": [2],
                                                                       "data_offsets": [0, 8]}})}
    extra = [x.format(**{k: str(v) for k, v in files.items()}) for x in extra]
    out = tmp_path / "out"
    error = one_error(run_in_process(flux_minimal_inference.main, _inference_args(tiny_ckpts, out, *extra)))
    assert needle in error, error
    named = extra[-1].split(";")[0]
    assert named in error or extra[0] in error, error  # names the file or the flag
    assert not out.exists() or not list(out.iterdir())


def test_hostile_interactive_prompt_lines_are_one_line_each(tiny_ckpts, tmp_path: Path) -> None:
    """kohya's interactive syntax: each bad line is one `error:` line and the session goes on (no image). Before,
    `--g nan` made a nan image, `--s 0` silently sampled 50 steps and `--w 100000` tried a 100000-pixel image."""
    lines = ["x --g nan", "x --c inf", "x --s 0", "x --s 100000", "x --w 100000", "x --h -8",
             "x --d 99999999999999999999999"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "flux_minimal_inference.py"),
                           *_inference_args(tiny_ckpts, out, "--interactive")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV, input="\n".join(lines) + "\n\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error: prompt line:" in line]
    assert len(errors) == len(lines), proc.stdout[-3000:]
    for needle, error in zip(["guidance (--g) nan", "CFG scale (--l / --c) inf", "steps (--s) 0", "steps (--s) 100000",
                              "width (--w) 100000", "height (--h) -8", "seed (--d)"], errors):
        assert needle in error, error
    assert not out.exists() or not list(out.glob("*.png"))
