"""The README's demo command (launch_train.sh) from a clean copy of the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from train_helpers import REPO, data  # noqa: F401 (data: a fixture)


def test_launch_script_demo_from_a_clean_copy(tmp_path: Path) -> None:
    """The README's main-job command: `bash launch_train.sh` with no model set trains the tiny demo."""
    import shutil

    clone = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    env = {**os.environ, "DEMO_EPOCHS": "2", "PYTHON": sys.executable}  # through library.train.launch
    env.pop("ACCELERATE", None)
    proc = subprocess.run(["bash", "launch_train.sh", "--save_every_n_epochs", "1", "--sample_every_n_epochs", "2"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = clone / "demo_output"
    assert (out / "demo_lora.safetensors").is_file() and (out / "demo_lora-000001.safetensors").is_file()
    assert (out / "demo_lora_loss.png").is_file() and (out / "demo_lora-state").is_dir()
    assert len(list((out / "sample").glob("demo_lora_e000002_*.png"))) == 2
    assert not list(clone.glob("dataset_configs/data/*/.flux_cache"))  # the demo writes nothing into the repo
