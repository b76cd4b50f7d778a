#!/usr/bin/env python
"""Train a differential FLUX.1 LoRA from (before, after) image pairs: parse -> stage 1 -> stage 2.

    python flux_train_differential.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config pairs.toml --output_dir out --output_name grade --network_dim 16 ...

The dataset TOML's subsets hold the after images in `image_dir` and the same-named before images in
`before_dir`. Writes out/grade_stage1.safetensors (the before-fit) and out/grade.safetensors (the result).
See docs/differential.md. Every flux_train_network.py flag is accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere without installing

from library.errors import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from library.differential.cli import help_text, split_args  # noqa: PLC0415
    from library.differential.run import dry_run, run_differential  # noqa: PLC0415
    from library.train.cli import parse_args  # noqa: PLC0415
    from library.train.reporting import setup_console_logging  # noqa: PLC0415

    opts, rest, wants_help = split_args(sys.argv[1:] if argv is None else argv)
    if wants_help:
        print(help_text())
        return 0
    parsed = parse_args(rest)
    if parsed.values["dry_run"] or parsed.values["validate_config"]:
        print(dry_run(parsed, opts))
        return 0
    from library.train.config import build_config  # noqa: PLC0415
    from library.train.trainer import train  # noqa: PLC0415 (imports torch/accelerate only when training)

    from library.train.reporting import warn  # noqa: PLC0415

    cfg = build_config(parsed)
    setup_console_logging(cfg.log)
    for line in cfg.warnings:
        warn(line)
    if opts.pair_mode == "average":
        from library.differential.average import run_average  # noqa: PLC0415

        result = run_average(parsed, opts, train)
    else:
        result = run_differential(parsed, opts, train)
    print(f"differential LoRA: {result}")
    return 0


if __name__ == "__main__":
    run_main(main)
