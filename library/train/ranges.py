"""The allowed range of every numeric flag, checked at parse time (before any file is read).

kohya checks a few of these late or not at all (`--max_train_epochs -1` trains "-3 steps" and overwrites
the LoRA; `--network_dropout 1.5` fails at the first step). Here every int and float flag has a range;
float flags never accept inf or nan (no flag of the trainer gives them a meaning). Flags that kohya
accepts but FLUX ignores only need to be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from library.errors import UserError
from library.train.flags import FLAGS


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed (strictly positive)
    hi_open: bool = False

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return ("greater than " if self.lo_open else "at least ") + f"{self.lo:g}"
        if self.hi is not None:
            return ("less than " if self.hi_open else "at most ") + f"{self.hi:g}"
        return "a finite number"

    def holds(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))


COUNT, POSITIVE, NONNEG, FRACTION = Range(1), Range(0, lo_open=True), Range(0), Range(0, 1)
SIDE = Range(32, 16384)  # pixels: a side beyond 16k is a typo, not a training resolution

RANGES: dict[str, Range] = {
    # ints
    "keep_tokens": NONNEG, "vae_batch_size": Range(1, 4096), "min_bucket_reso": SIDE, "max_bucket_reso": SIDE,
    "bucket_reso_steps": Range(1, 4096), "token_warmup_min": NONNEG, "caption_dropout_every_n_epochs": NONNEG,
    "dataset_repeats": COUNT, "save_every_n_epochs": COUNT, "save_every_n_steps": COUNT, "save_n_epoch_ratio": COUNT,
    "save_last_n_epochs": COUNT, "save_last_n_epochs_state": COUNT, "save_last_n_steps": COUNT,
    "save_last_n_steps_state": COUNT, "train_batch_size": Range(1, 4096), "max_train_epochs": COUNT,
    "max_data_loader_n_workers": Range(0, 1024), "seed": Range(0, 2**32 - 1),
    "gradient_accumulation_steps": COUNT, "ddp_timeout": COUNT, "clip_skip": NONNEG,
    "multires_noise_iterations": NONNEG, "min_timestep": NONNEG, "max_timestep": NONNEG,
    "sample_every_n_steps": COUNT, "sample_every_n_epochs": COUNT, "lr_scheduler_num_cycles": COUNT,
    "lr_scheduler_timescale": COUNT, "network_dim": Range(1, 65536), "initial_epoch": COUNT, "initial_step": NONNEG,
    "validation_seed": Range(0, 2**32 - 1), "validate_every_n_steps": COUNT, "validate_every_n_epochs": COUNT,
    "max_validation_steps": COUNT, "text_encoder_batch_size": Range(1, 4096),
    "t5xxl_max_token_length": Range(1, 512),  # FLUX's T5 was trained with at most 512 tokens
    # floats
    "token_warmup_step": NONNEG, "caption_dropout_rate": FRACTION, "caption_tag_dropout_rate": FRACTION,
    "ip_noise_gamma": NONNEG, "huber_c": POSITIVE, "huber_scale": POSITIVE, "prior_loss_weight": NONNEG,
    "learning_rate": POSITIVE, "max_grad_norm": NONNEG, "lr_scheduler_power": NONNEG,
    "lr_scheduler_min_lr_ratio": FRACTION, "unet_lr": NONNEG, "text_encoder_lr": NONNEG, "network_alpha": NONNEG,
    "network_dropout": Range(0, 1, hi_open=True), "scale_weight_norms": POSITIVE,
    "validation_split": Range(0, 1, hi_open=True), "logit_std": POSITIVE, "guidance_scale": NONNEG,
    "sigmoid_scale": POSITIVE, "discrete_flow_shift": POSITIVE,
    # int or float (a count, or a ratio of the steps)
    "lr_warmup_steps": NONNEG, "lr_decay_steps": NONNEG,
}
_NUMERIC = {f.name for f in FLAGS if f.kind in ("int", "float", "int_or_float")}


def check_ranges(values: Mapping[str, Any]) -> None:
    """Raise one UserError naming the first numeric flag outside its range (or non-finite)."""
    for name in sorted(_NUMERIC):
        value = values.get(name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, bool):
                continue
            if not math.isfinite(v):
                raise UserError(f"command line: --{name} must be a finite number (got {v})")
            r = RANGES.get(name)
            if r is not None and not r.holds(v):
                raise UserError(f"command line: --{name} must be {r.describe()} (got {v})")
