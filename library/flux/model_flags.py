"""The model flags the image-making entry points share (flux_minimal_inference.py, flux_restore.py,
flux_eval_lora.py): dtype names as given on the command line, and the components a diffusers FLUX folder
supplies when --clip_l / --t5xxl / --ae are left out. No torch here, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.errors import UserError

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32", "float": "float32",
          "float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn"}
FP8 = "float8_e4m3fn"


def dtype_arg(text: str) -> str:
    """argparse `type=`: a dtype name (bf16, fp16, fp32, fp8 and their long forms) -> its torch name."""
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[text.lower()]


def compute_dtype(dtype: str) -> str:
    return "bfloat16" if dtype == FP8 else dtype  # fp8 weights are upcast; the math runs in bf16


def component_path(explicit: str | None, ckpt: Path, flag: str, subfolder: str) -> Path:
    """The file given by `flag`, else the diffusers folder --ckpt_path when it has `subfolder`/."""
    if explicit:
        return Path(explicit)
    if ckpt.is_dir() and (ckpt / subfolder).is_dir():
        return ckpt
    raise UserError(f"{flag} is required unless --ckpt_path is a diffusers FLUX folder with {subfolder}/ "
                    f"({ckpt} is not)")
