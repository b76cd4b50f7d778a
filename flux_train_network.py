#!/usr/bin/env python
"""Train a FLUX.1 LoRA with kohya sd-scripts' command line: parse -> build -> train -> close.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config data.toml --output_dir out --network_module networks.lora_flux --network_dim 16 ...

See docs/training.md. Every kohya flag is accepted; flags that do nothing for FLUX print a warning.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere without installing

from library.errors import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from library.train.cli import parse_args, write_config_file  # noqa: PLC0415
    from library.train.config import build_config  # noqa: PLC0415
    from library.train.reporting import setup_console_logging, warn  # noqa: PLC0415

    parsed = parse_args(sys.argv[1:] if argv is None else argv)
    if parsed.values["output_config"]:
        print(f"wrote {write_config_file(parsed)}")
        return 0
    cfg = build_config(parsed)
    setup_console_logging(cfg.log)
    if cfg.data.validate_config or cfg.data.dry_run:
        from library.train.dry_run import inspect_data  # noqa: PLC0415

        # Read-only data inspection: the training warnings (ineffective flags, the sigma_scaled default)
        # are not about the data; the dataset layer prints its own.
        return inspect_data(cfg)
    for line in cfg.warnings:
        warn(line)

    from library.train.trainer import train  # noqa: PLC0415 (imports torch/accelerate only when training)

    train(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
