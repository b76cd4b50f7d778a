"""Precision flags -> the dtypes of each part of training.

    --mixed_precision no    everything float32
    --mixed_precision bf16  frozen transformer stored in bf16, autocast bf16, LoRA weights float32
    --mixed_precision fp16  the same with fp16 (accelerate's GradScaler protects the fp32 LoRA grads)
    --full_bf16 / full_fp16 the LoRA weights themselves in bf16 / fp16 (half the optimizer memory)
    --fp8_base              transformer block Linears stored as float8 e4m3, computed in the autocast dtype
    --fp8_matmul            (ours) block Linears as e4m3 with per-row scales, forward matmuls in fp8; it
                            quantises the bf16 weights itself, so the loader's unscaled fp8 (--fp8_base) is off
    --save_precision        dtype of the saved LoRA (float / fp16 / bf16; default: the LoRA's own dtype)
    --no_half_vae           the AE in float32 (encoding for the latent cache / each step, decoding samples)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.train.config import PrecisionConfig

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAVE = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Dtypes:
    compute: torch.dtype  # autocast dtype and storage dtype of the frozen models
    network: torch.dtype  # LoRA parameters
    save: torch.dtype  # LoRA file
    fp8_base: bool  # transformer block weights stored as float8 e4m3 (unscaled, at load)
    fp8_matmul: bool  # block weights quantised with per-row scales after load, forward matmuls in fp8
    ae: torch.dtype
    text: torch.dtype


def resolve_dtypes(cfg: PrecisionConfig) -> Dtypes:
    compute = _DTYPES[cfg.mixed_precision]
    network = torch.bfloat16 if cfg.full_bf16 else torch.float16 if cfg.full_fp16 else torch.float32
    save = _SAVE[cfg.save_precision] if cfg.save_precision else network
    # T5-XXL overflows in fp16 (its FF activations exceed 65504); keep it in bf16/fp32 as diffusers does.
    text = torch.float32 if compute == torch.float16 else compute
    return Dtypes(compute=compute, network=network, save=save, fp8_base=cfg.fp8_base and not cfg.fp8_matmul,
                  fp8_matmul=cfg.fp8_matmul,
                  ae=torch.float32 if cfg.no_half_vae else compute, text=text)
