"""Bad input to flux_eval_lora.py: one line `error: ...` naming the file and flag, exit status 2, no traceback.

The cases call its `main` in this process (tests/cli_helpers.py); one runs `flux_eval_lora.py` as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flux_eval_lora
from cli_helpers import run_in_process
from eval_helpers import tiny_dino  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def run_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "flux_eval_lora.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)


def run(*args):
    return run_in_process(flux_eval_lora.main, list(args))


def assert_user_error(res, *expect: str) -> None:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), res.stderr[-3000:]
    for text in expect:
        assert text in last, last


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "lora_10_00_1_1.png")
    (tmp_path / "prompts.json").write_text(json.dumps({"00": "a photo of sks dog"}))
    return tmp_path


def _score(folder: Path, *extra):
    return run("score", "--images", folder / "images", "--prompts", folder / "prompts.json", "--out",
               folder / "s.csv", "--device", "cpu", *extra)


def test_missing_clip_model(folder):
    assert_user_error(_score(folder, "--clip_model", folder / "nope"), str(folder / "nope"), "--clip_model")


def test_non_clip_model(folder, tiny_dino):
    assert_user_error(_score(folder, "--clip_model", tiny_dino), "config.json", "--clip_model", "'dinov2'")


def test_bad_image_name(folder):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "holiday.png")
    assert_user_error(_score(folder), "holiday.png", "<lora>_<step>_<promptid>")


def test_prompt_id_missing(folder):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "lora_10_07_1_1.png")
    assert_user_error(_score(folder), "lora_10_07_1_1.png", "'07'", "prompts.json")


def test_unwritable_out(folder):
    (folder / "a_file").write_text("x")
    res = run("score", "--images", folder / "images", "--prompts", folder / "prompts.json", "--out",
              folder / "a_file" / "s.csv")
    assert_user_error(res, "--out", "a_file")
    if os.geteuid() != 0:  # root may write anywhere
        ro = folder / "ro"
        ro.mkdir(mode=0o500)
        assert_user_error(run("score", "--images", folder / "images", "--out", ro / "s.csv"), "not writable")
    assert not (folder / "s.csv").exists()


def test_bad_render_flags(folder):
    res = run_process("render", "--ckpt_path", folder / "missing.safetensors", "--prompts",
                      folder / "prompts.json", "--out_dir", folder / "out")
    assert_user_error(res, "missing.safetensors", "--ckpt_path")
    res = run("report", "--scores", folder / "none.csv", "--out_dir", folder / "r")
    assert_user_error(res, "none.csv")
