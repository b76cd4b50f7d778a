"""Dockerfile.train cannot be built here: lint it and check that everything it copies exists."""

from __future__ import annotations

import io
import shlex
from pathlib import Path

from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]


def _parsed() -> DockerfileParser:
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / "Dockerfile.train").read_bytes()))  # path= wants a folder
    return parser


def test_structure() -> None:
    df = _parsed()
    instructions = [i["instruction"] for i in df.structure]
    assert instructions.count("FROM") == 1
    assert "cuda" in df.baseimage or "BASE_IMAGE" in df.baseimage
    args = {i["value"].split("=")[0]: i["value"].split("=", 1)[1] for i in df.structure if i["instruction"] == "ARG"}
    assert "pytorch/pytorch" in args["BASE_IMAGE"] and "cuda" in args["BASE_IMAGE"]
    entry = next(i["value"] for i in df.structure if i["instruction"] == "ENTRYPOINT")
    assert "launch_train.sh" in entry
    # requirements are installed from the pinned file, before the code is copied (layer caching)
    runs = [i for i in df.structure if i["instruction"] == "RUN"]
    assert any("-r requirements.txt" in r["value"] for r in runs)
    copies = [i for i in df.structure if i["instruction"] == "COPY"]
    assert "requirements.txt" in copies[0]["value"]
    assert instructions.index("RUN") < instructions.index("COPY", instructions.index("COPY") + 1)


def test_everything_copied_exists_and_is_pinned() -> None:
    df = _parsed()
    for item in df.structure:
        if item["instruction"] not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(item["value"]) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"Dockerfile.train copies {src}, which does not exist"
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            assert "==" in line, f"requirements.txt: {line} is not pinned"


def test_launch_script_has_one_accelerate_line() -> None:
    text = (REPO / "launch_train.sh").read_text()
    lines = [line for line in text.splitlines() if line.startswith('"${LAUNCH[@]}"')
             and "flux_train_network.py" in line]
    assert len(lines) == 1
    assert 'LAUNCH=("$PYTHON" -m library.train.launch)' in text  # accelerate launch, ending cleanly on SIGTERM
    assert "tools/make_tiny_checkpoints.py" in text and "demo_output" in text
