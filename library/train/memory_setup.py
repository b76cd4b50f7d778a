"""--max_vram_gib and the memory lines of --dry_run: the memory model (memory_plan.py) applied to a config.

The workload comes from the transformer file's header (no weights are read), the largest training
resolution and batch of the dataset config, the T5 length and the LoRA rank. `--max_vram_gib N` replaces
checkpointing, fp8 storage and block swap by the fastest predicted setup that fits a card of N GiB;
--fp8_base, --blocks_to_swap and --gradient_checkpointing_blocks given explicitly are kept as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from library.errors import UserError
from library.flux.loading import load_transformer
from library.flux.text_encoders import default_t5_max_length
from library.train import memory_plan as P
from library.train.config import TrainConfig
from library.train.precision import Dtypes

log = logging.getLogger(__name__)

_OPTIMIZER_STATE_BYTES = {"adamw8bit": 2.0, "pagedadamw8bit": 2.0, "lion": 4.0, "lion8bit": 1.0, "sgd": 0.0,
                          "adafactor": 4.0}  # per trainable parameter; AdamW and the rest: two fp32 moments


def calibration() -> tuple[P.Calibration, str]:
    """The memory model's constants for this process's CUDA device (H100 constants without one)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return P.calibration_for(name)


def workload(cfg: TrainConfig, datasets: Any) -> P.Workload:
    """The step's sizes: `datasets` are DatasetConfig-like (resolution (W, H), batch_size)."""
    path = cfg.model.pretrained_model_name_or_path
    if not path:
        raise UserError("command line: --max_vram_gib needs --pretrained_model_name_or_path")
    params = load_transformer(path, "meta").params  # header only
    img = max((ds.resolution[0] // 16) * (ds.resolution[1] // 16) for ds in datasets)
    batch = max(ds.batch_size for ds in datasets)
    txt = cfg.model.t5xxl_max_token_length or default_t5_max_length(params.guidance_embed)
    weight = 2.0 if (cfg.precision.full_bf16 or cfg.precision.full_fp16) else 4.0
    state = 2 * weight + _OPTIMIZER_STATE_BYTES.get(cfg.optimizer.optimizer_type.lower(), 8.0)
    rank = cfg.network.network_dim or 4
    return P.workload_for(params, img, txt, batch, rank, cfg.speed.torch_compile, state)


def fixed_choices(cfg: TrainConfig) -> dict[str, Any]:
    """What the user set explicitly, which the planner must keep (None: free)."""
    m = cfg.memory
    p = cfg.precision
    return {"fp8": True if (p.fp8_base or p.fp8_matmul) else (False if p.mixed_precision == "no" else None),
            "swap": m.blocks_to_swap, "checkpointed": m.gradient_checkpointing_blocks,
            "fp8_matmul": p.fp8_matmul}


def configured_choice(cfg: TrainConfig, w: P.Workload) -> P.Choice:
    """The setup the flags describe (no --max_vram_gib)."""
    m = cfg.memory
    k = m.gradient_checkpointing_blocks if m.gradient_checkpointing_blocks is not None else (
        w.n_blocks if (m.gradient_checkpointing or m.cpu_offload_checkpointing) else 0)
    return P.Choice(min(k, w.n_blocks), cfg.precision.fp8_base or cfg.precision.fp8_matmul, m.blocks_to_swap or 0,
                    cfg.precision.fp8_matmul)


def apply_max_vram(cfg: TrainConfig, dtypes: Dtypes, datasets: Any) -> tuple[TrainConfig, Dtypes]:
    """With --max_vram_gib: the config and dtypes of the chosen setup (else both unchanged)."""
    budget = cfg.memory.max_vram_gib
    if budget is None:
        return cfg, dtypes
    w = workload(cfg, datasets)
    cal, how = calibration()
    best = P.choose(w, budget, cal, **fixed_choices(cfg))
    if best is None:
        least = min((P.predict(w, c, cal) for c in P.candidates(w, **fixed_choices(cfg))), key=lambda p: p.peak_gib)
        raise UserError(f"command line: --max_vram_gib {budget:g}: no setup fits (the smallest, "
                        f"{least.choice.describe(w.n_blocks)}, needs about {least.peak_gib:.1f} GiB); lower the "
                        "resolution, the batch size or --network_dim, or raise --max_vram_gib")
    c = best.choice
    memory = dataclasses.replace(
        cfg.memory, gradient_checkpointing=c.checkpointed_blocks > 0,
        gradient_checkpointing_blocks=c.checkpointed_blocks if 0 < c.checkpointed_blocks < w.n_blocks else None,
        blocks_to_swap=c.blocks_to_swap or None)
    fp8_base = c.fp8 and not cfg.precision.fp8_matmul  # --fp8_matmul quantises the weights itself
    precision = dataclasses.replace(cfg.precision, fp8_base=fp8_base)
    log.info("--max_vram_gib %g: %s (predicted peak %.1f GiB, step %.0f ms; memory model %s)", budget,
             c.describe(w.n_blocks), best.peak_gib, 1e3 * best.step_s, how)
    return dataclasses.replace(cfg, memory=memory, precision=precision), dataclasses.replace(dtypes, fp8_base=fp8_base)


def format_report(cfg: TrainConfig, datasets: Any) -> str:
    """--dry_run: predicted peak and step time of this configuration and the best setup per card size."""
    w = workload(cfg, datasets)
    fixed = fixed_choices(cfg)
    cal, how = calibration()
    if cfg.memory.max_vram_gib is not None:
        chosen = P.choose(w, cfg.memory.max_vram_gib, cal, **fixed)
        head = f"with --max_vram_gib {cfg.memory.max_vram_gib:g}: {P.format_prediction(chosen, w.n_blocks)}"
    else:
        head = f"as configured: {P.format_prediction(P.predict(w, configured_choice(cfg, w), cal), w.n_blocks)}"
    lines = [f"memory plan (predicted; {w.batch} x ({w.img_tokens} image + {w.txt_tokens} text tokens), "
             f"{w.lora_params / 1e6:.1f} M LoRA parameters, {'compiled' if w.compiled else 'eager'}; "
             f"model {how}, see BENCHMARKS.md):", f"  {head}"]
    for size, p in P.fits_table(w, cal, **fixed):
        lines.append(f"  {size:g} GiB card: {P.format_prediction(p, w.n_blocks)}")
    return "\n".join(lines)
