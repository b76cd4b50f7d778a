"""flux_train_differential.py's own flags; everything else is flux_train_network.py's command line."""

from __future__ import annotations

import argparse
from typing import Sequence

from library.differential.stages import DifferentialOptions
from library.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"command line: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flux_train_differential.py", add_help=False, allow_abbrev=False,
                description="Train a differential FLUX.1 LoRA from (before, after) image pairs: stage 1 fits the "
                            "befores, stage 2 learns the afters on base + stage 1; only stage 2 is kept. Every "
                            "flag of flux_train_network.py is accepted too (listed below).")
    g = p.add_argument_group("differential (stage 1 = the before images; defaults over-fit on purpose)")
    g.add_argument("--stage1_max_train_steps", type=int, default=None, help="stage-1 steps (default 2 x --max_train_steps)")
    g.add_argument("--stage1_learning_rate", type=float, default=None,
                   help="stage-1 learning rate (default --unet_lr or --learning_rate)")
    g.add_argument("--stage1_network_dim", type=int, default=None, help="stage-1 rank (default 2 x --network_dim, >= 8)")
    g.add_argument("--stage1_network_alpha", type=float, default=None, help="stage-1 alpha (default its rank: scale 1)")
    g.add_argument("--stage1_lr_scheduler", default="constant", help="stage-1 LR schedule (default constant)")
    g.add_argument("--stage1_weights", default=None, help="use this stage-1 LoRA instead of training one")
    g.add_argument("--pair_mode", default="single", choices=("single", "average"),
                   help="average: one differential LoRA per pair subset, averaged into the result (less variance)")
    return p


def split_args(argv: Sequence[str]) -> tuple[DifferentialOptions, list[str], bool]:
    """(our options, the trainer's argv, --help asked)."""
    argv = list(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    ns, rest = build_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
    opts = DifferentialOptions(**vars(ns))
    for name in ("stage1_max_train_steps", "stage1_network_dim"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise UserError(f"command line: --{name} must be at least 1")
    if opts.stage1_learning_rate is not None and not opts.stage1_learning_rate > 0:
        raise UserError("command line: --stage1_learning_rate must be positive")
    return opts, rest, wants_help


def help_text() -> str:
    from library.train.cli import build_parser as train_parser  # noqa: PLC0415

    ours = build_parser().format_help()
    theirs = train_parser().format_help().split("\n\n", 2)[-1]  # the flag groups, without usage/description
    return ours + "\nflux_train_network.py flags (all passed through to both stages):\n\n" + theirs
