"""The two stages of a differential LoRA as typed training configs, built from one kohya command line.

Stage 1 fits a LoRA to the "before" images (`before_dir`), deliberately over-fitted, so that the base plus
stage 1 reproduces the befores; stage 2 trains a fresh LoRA on the "after" images with stage 1 merged into
the base at multiplier 1 (the `--base_weights` code path), so what it learns is only after − before.
Only stage 2 is the result (docs/differential.md).

Each stage is the user's command line with a few values replaced (output name, steps, learning rate, rank,
base weights, which side of the pairs is trained), parsed again by the trainer's own config builder, so
every kohya flag passes through and is validated exactly as flux_train_network.py validates it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.data.pairs import AFTER, BEFORE
from library.errors import UserError
from library.train.cli import ParsedArgs
from library.train.config import TrainConfig, build_config

STAGE1_SUFFIX = "_stage1"


@dataclass(frozen=True)
class DifferentialOptions:
    """The flags of flux_train_differential.py that flux_train_network.py does not have."""

    stage1_max_train_steps: int | None = None  # default: 2 x --max_train_steps (or 2 x --max_train_epochs)
    stage1_learning_rate: float | None = None  # default: --unet_lr or --learning_rate
    stage1_network_dim: int | None = None  # default: 2 x --network_dim, at least 8
    stage1_network_alpha: float | None = None  # default: the stage-1 rank (scale 1)
    stage1_lr_scheduler: str = "constant"
    stage1_weights: str | None = None  # an existing stage-1 LoRA: stage 1 is not trained
    pair_mode: str = "single"  # single | average (one differential LoRA per subset, averaged)


@dataclass(frozen=True)
class Stage:
    index: int  # 1 | 2
    side: str  # which images of the pairs it trains on: "before" | "after"
    output_name: str
    train: TrainConfig | None  # None: stage 1 taken from --stage1_weights
    path: Path  # the LoRA file it produces (or the given stage-1 file)


def result_name(parsed: ParsedArgs) -> str:
    return parsed.values.get("output_name") or "last"


def _override(parsed: ParsedArgs, **values: Any) -> ParsedArgs:
    return ParsedArgs(values={**parsed.values, **values}, given=parsed.given | frozenset(values))


def stage1_values(parsed: ParsedArgs, opts: DifferentialOptions) -> dict[str, Any]:
    """The stage-1 replacements, with the over-fitting defaults."""
    v = parsed.values
    steps = opts.stage1_max_train_steps or 2 * int(v["max_train_steps"])
    # stage 2 counted in epochs: stage 1 gets twice its epochs unless its steps are given
    epochs = 2 * int(v["max_train_epochs"]) if v["max_train_epochs"] and not opts.stage1_max_train_steps else None
    lr = opts.stage1_learning_rate if opts.stage1_learning_rate is not None else (v["unet_lr"] or v["learning_rate"])
    dim = opts.stage1_network_dim or max(8, 2 * int(v["network_dim"] or 4))
    alpha = opts.stage1_network_alpha if opts.stage1_network_alpha is not None else float(dim)
    return {"output_name": result_name(parsed) + STAGE1_SUFFIX, "max_train_steps": steps, "max_train_epochs": epochs,
            "learning_rate": lr, "unet_lr": None, "network_dim": dim, "network_alpha": alpha,
            "lr_scheduler": opts.stage1_lr_scheduler, "lr_warmup_steps": 0, "network_weights": None,
            "dim_from_weights": False}


def stage2_values(parsed: ParsedArgs, stage1: Path) -> dict[str, Any]:
    """Stage 2: the user's settings, with stage 1 appended to --base_weights at multiplier 1."""
    v = parsed.values
    base = list(v["base_weights"] or [])
    mults = list(v["base_weights_multiplier"] or [])
    if mults and len(mults) != len(base):
        raise UserError("command line: --base_weights_multiplier needs one value per --base_weights file")
    return {"output_name": result_name(parsed), "base_weights": base + [str(stage1)],
            "base_weights_multiplier": mults + [1.0] if mults else None}


def _config(parsed: ParsedArgs, side: str, metadata: dict[str, str] | None = None) -> TrainConfig:
    cfg = build_config(parsed)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pair_side=side))
    if metadata:
        cfg = dataclasses.replace(cfg, save=dataclasses.replace(cfg.save, metadata={**cfg.save.metadata, **metadata}))
    return cfg


def check_command(parsed: ParsedArgs) -> None:
    v = parsed.values
    if v["resume"]:
        raise UserError("command line: --resume: a differential run resumes by itself; run the same command again")
    if not v["dataset_config"]:
        raise UserError("command line: --dataset_config PATH is required (subsets with image_dir = the after images "
                        "and before_dir = the before images; see docs/differential.md)")
    if (v["save_model_as"] or "safetensors") != "safetensors":
        raise UserError(f"command line: --save_model_as {v['save_model_as']}: a differential run writes safetensors")
    if v["fp8_base"] or v["fp8_base_unet"]:
        raise UserError("command line: --fp8_base: stage 2 merges stage 1 into the base weights (--base_weights), "
                        "which fp8 weights cannot take; train the differential LoRA without --fp8_base")
    if v["network_train_text_encoder_only"]:
        raise UserError("command line: --network_train_text_encoder_only: a differential LoRA trains the transformer")


def plan_stage1(parsed: ParsedArgs, opts: DifferentialOptions) -> Stage:
    out = Path(parsed.values["output_dir"] or "output")
    if opts.stage1_weights:
        return Stage(1, BEFORE, Path(opts.stage1_weights).stem, None, Path(opts.stage1_weights))
    values = stage1_values(parsed, opts)
    cfg = _config(_override(parsed, **values), BEFORE)
    return Stage(1, BEFORE, values["output_name"], cfg, out / f"{values['output_name']}.safetensors")


def plan_stage2(parsed: ParsedArgs, stage1: Path, stage1_sha256: str | None) -> Stage:
    out = Path(parsed.values["output_dir"] or "output")
    values = stage2_values(parsed, stage1)
    md = {"differential_stage1": stage1.name, "differential_stage1_sha256": stage1_sha256 or "(after stage 1)"}
    cfg = _config(_override(parsed, **values), AFTER, md)
    return Stage(2, AFTER, values["output_name"], cfg, out / f"{values['output_name']}.safetensors")
