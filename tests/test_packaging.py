"""pyproject.toml: `pip install .` and `pip install -e .` work (explicit packages, tokenizers as package data).

Builds from a copy of the tracked files (a build writes build/ and *.egg-info beside the sources), offline:
--no-build-isolation uses the setuptools of this environment, --no-deps installs nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _copy_sources(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    names = [n for n in files.decode().split("\0") if n]
    if not names:  # not a git checkout (an sdist): copy the tree
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".venv", "__pycache__", "build", "*.egg-info"))
        return dst
    for name in names + ["pyproject.toml"]:
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


def _modules(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for d in ("library", "networks") for p in (root / d).rglob("*.py")}


_CHECK = """
import sys, site
site.addsitedir(sys.argv[1])
import flux_train_network, library.flux.text_encoders as te, library.train.trainer, networks.lora_flux
from pathlib import Path
if sys.argv[2] == "tokenizers":  # the package data is found where the package is installed
    clip, t5 = te.load_tokenizers()
    assert clip("a photo").input_ids and t5("a photo").input_ids
print(Path(te.__file__).resolve())
"""


def _import_from(target: Path, cwd: Path, tokenizers: bool) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _CHECK, str(target), "tokenizers" if tokenizers else "-"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_wheel_and_editable_install(tmp_path: Path) -> None:
    src = _copy_sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    proc = subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = {m for m in _modules(src) if m not in names}
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"
    assert {"flux_train_network.py", "flux_minimal_inference.py", "library/flux/tokenizers/clip_l/vocab.json",
            "library/flux/tokenizers/t5_v1_1_xxl/tokenizer.json"} <= names
    assert not any(n.startswith(("tests/", "tools/", "dataset_configs/")) for n in names)

    target = tmp_path / "site"
    proc = subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _import_from(target, elsewhere, True).is_relative_to(target.resolve())  # the installed copy, tokenizers too

    editable = tmp_path / "editable"
    proc = subprocess.run([*PIP, "install", "--no-deps", "--no-build-isolation", "--target", str(editable),
                           "-e", str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _import_from(editable, elsewhere, False).is_relative_to(src.resolve())  # -e: the sources themselves
