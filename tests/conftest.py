"""Shared fixtures: offline guards and the tiny seeded checkpoints every model-level test uses."""

from __future__ import annotations

import os

import pytest

# Nothing may be downloaded in tests: make transformers / diffusers / huggingface_hub fail fast instead.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Tiny FLUX.1-dev-layout checkpoints (TinyCheckpoints): BFL/ComfyUI single files + a diffusers folder."""
    from library.flux.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_dev"), seed=0, guidance_embed=True)


@pytest.fixture(scope="session")
def tiny_ckpts_schnell(tmp_path_factory):
    """The schnell variant (no guidance embedding) of `tiny_ckpts`."""
    from library.flux.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_schnell"), seed=1, guidance_embed=False)
