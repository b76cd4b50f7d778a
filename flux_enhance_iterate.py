#!/usr/bin/env python
"""Iterative enhancement with differential LoRAs: round 0 on your pairs, N rounds on generated pairs, combined.

    python flux_enhance_iterate.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config pairs.toml --output_dir out --output_name enhance --iterations 2 \
        --prompts prompts.txt [--pair_command "python make_pairs.py --model {model} --out {out}"] ...

Writes out/round_K/ (working model, pairs, the round's differential LoRA) and out/enhance.safetensors (all
rounds combined). Stop it any time; the same command continues. See docs/differential.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere without installing

from library.errors import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from library.differential.cli import help_text, split_args  # noqa: PLC0415
    from library.train.cli import parse_args  # noqa: PLC0415

    (diff, it), rest, wants_help = split_args(sys.argv[1:] if argv is None else argv, iterate=True)
    if wants_help:
        print(help_text(iterate=True))
        return 0
    parsed = parse_args(rest)
    from library.differential.iterate import run_iterations  # noqa: PLC0415
    from library.train.config import build_config  # noqa: PLC0415
    from library.train.reporting import setup_console_logging, warn  # noqa: PLC0415
    from library.train.trainer import train  # noqa: PLC0415 (imports torch/accelerate only when training)

    cfg = build_config(parsed)
    setup_console_logging(cfg.log)
    for line in cfg.warnings:
        warn(line)
    result = run_iterations(parsed, diff, it, train)
    print(f"combined LoRA: {result}")
    return 0


if __name__ == "__main__":
    run_main(main)
