"""--validate_config and --dry_run: look at the data without loading a model or training.

The dataset layer owns what is printed (library.data.config.format_resolved and the data plan); this
module only routes the flags there with the typed dataset flags of the config (`cfg.data.flags`).
"""

from __future__ import annotations

from pathlib import Path

from library.data.config import format_resolved, load_dataset_config
from library.data.dataset import build_datasets
from library.data.plan import build_plan, format_plan
from library.data.preview import write_degradation_preview
from library.errors import UserError
from library.train.config import DEFAULT_SEED, TrainConfig
from library.train.memory_setup import format_report


def inspect_data(cfg: TrainConfig) -> int:
    flag = "--validate_config" if cfg.data.validate_config else "--dry_run"
    if not cfg.data.dataset_config:
        raise UserError(f"command line: {flag} needs --dataset_config PATH")
    resolved = load_dataset_config(cfg.data.dataset_config, cfg.data.flags)
    if cfg.data.validate_config:
        print(format_resolved(resolved))
        return 0
    loop = cfg.loop
    seed = loop.seed if loop.seed is not None else DEFAULT_SEED
    train, val = build_datasets(resolved, seed, cfg.data.skip_bad_images)
    print(format_plan(build_plan(train, loop.max_train_steps, loop.max_train_epochs,
                                 loop.gradient_accumulation_steps, 1, val)))
    sheet = write_degradation_preview(train, Path(cfg.save.output_dir))  # None without degraded subsets
    if sheet is not None:
        print(f"contact sheet of (target, control) pairs: {sheet}")
    if cfg.model.pretrained_model_name_or_path:  # predicted GPU memory and step time (header only)
        print(format_report(cfg, resolved.datasets))
    return 0
