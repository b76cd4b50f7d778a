"""--validate_config and --dry_run: look at the data without loading a model or training.

The dataset layer owns what is printed (library.data.config.format_resolved and the data plan); this
module only routes the flags there with the CLI values the user gave.
"""

from __future__ import annotations

from library.data.config import format_resolved, load_dataset_config
from library.data.plan import format_plan, make_plan
from library.errors import UserError
from library.train.config import DEFAULT_SEED, TrainConfig


def inspect_data(cfg: TrainConfig) -> int:
    flag = "--validate_config" if cfg.data.validate_config else "--dry_run"
    if not cfg.data.dataset_config:
        raise UserError(f"command line: {flag} needs --dataset_config PATH")
    resolved = load_dataset_config(cfg.data.dataset_config, cfg.data.cli_values)
    if cfg.data.validate_config:
        print(format_resolved(resolved))
        return 0
    loop = cfg.loop
    seed = loop.seed if loop.seed is not None else DEFAULT_SEED
    print(format_plan(make_plan(resolved, seed=seed, max_train_steps=loop.max_train_steps,
                                max_train_epochs=loop.max_train_epochs,
                                gradient_accumulation_steps=loop.gradient_accumulation_steps,
                                skip_bad_images=cfg.data.skip_bad_images)))
    return 0
