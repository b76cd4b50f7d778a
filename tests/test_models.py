"""library/train/models.py: memory and speed options applied to the transformer."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.flux.loading import load_transformer
from library.train.cli import parse_args
from library.train.config import build_config
from library.train.models import apply_memory_and_speed


def test_xformers_flag_reaches_the_model(tiny_ckpts) -> None:
    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    cfg = build_config(parse_args(["--xformers", "--gradient_checkpointing"]))
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers"):
            apply_memory_and_speed(cfg, model, torch.device("cpu"))
    else:
        apply_memory_and_speed(cfg, model, torch.device("cpu"))
        assert model.gradient_checkpointing
