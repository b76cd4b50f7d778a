"""library/train/precision.py: precision flags -> the dtypes of each part."""

from __future__ import annotations

import torch

from library.train.cli import parse_args
from library.train.config import build_config
from library.train.precision import resolve_dtypes


def test_precision_dtypes() -> None:
    def dt(*argv: str):
        return resolve_dtypes(build_config(parse_args(list(argv))).precision)

    assert dt().compute == torch.float32 and dt().network == torch.float32 and dt().save == torch.float32
    bf = dt("--mixed_precision", "bf16", "--full_bf16", "--save_precision", "fp16", "--fp8_base")
    assert (bf.compute, bf.network, bf.save, bf.fp8_base) == (torch.bfloat16, torch.bfloat16, torch.float16, True)
    assert dt("--mixed_precision", "fp16").text == torch.float32  # T5 overflows in fp16
