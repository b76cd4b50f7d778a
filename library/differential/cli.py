"""flux_train_differential.py's own flags; everything else is flux_train_network.py's command line."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

from library.differential.iterate import IterateOptions
from library.differential.stages import DifferentialOptions
from library.errors import UserError
from library.train.cli import build_parser as train_parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"command line: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flux_train_differential.py", add_help=False, allow_abbrev=False,
                description="Train a differential FLUX.1 LoRA from (before, after) image pairs: stage 1 fits the "
                            "befores, stage 2 learns the afters on base + stage 1; only stage 2 is kept. Every "
                            "flag of flux_train_network.py is accepted too (listed below).")
    g = p.add_argument_group("differential (stage 1 = the before images; defaults over-fit on purpose)")
    g.add_argument("--stage1_max_train_steps", type=int, default=None,
                   help="stage-1 steps (default 2 x --max_train_steps, or 2 x --max_train_epochs epochs)")
    g.add_argument("--stage1_learning_rate", type=float, default=None,
                   help="stage-1 learning rate (default --unet_lr or --learning_rate)")
    g.add_argument("--stage1_network_dim", type=int, default=None,
                   help="stage-1 rank (default 2 x --network_dim, >= 8)")
    g.add_argument("--stage1_network_alpha", type=float, default=None, help="stage-1 alpha (default its rank: scale 1)")
    g.add_argument("--stage1_lr_scheduler", default="constant", help="stage-1 LR schedule (default constant)")
    g.add_argument("--stage1_weights", default=None, help="use this stage-1 LoRA instead of training one")
    g.add_argument("--pair_mode", default="single", choices=("single", "average"),
                   help="average: one differential LoRA per pair subset, averaged into the result (less variance)")
    return p


def add_iterate_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("iterative enhancement (flux_enhance_iterate.py)")
    g.add_argument("--iterations", type=int, default=1, help="rounds after round 0 (default 1)")
    g.add_argument("--initial_lora", default=None,
                   help="round 0's differential LoRA (default: trained from --dataset_config's pairs)")
    g.add_argument("--pair_command", default=None,
                   help="shell template making a round's pairs: must write {out}/before/NAME.png and "
                        "{out}/after/NAME.png (+ NAME.txt captions); placeholders {model} {out} {round} {lora} "
                        "{ae} {clip_l} {t5xxl} {prompts}")
    g.add_argument("--prompts", default=None, help="prompt file (one per line) for the built-in pair generation")
    g.add_argument("--images_per_prompt", type=int, default=2, help="built-in pairs: seeds per prompt (default 2)")
    g.add_argument("--after_strength", type=float, default=1.0,
                   help="built-in pairs: the last round's LoRA strength for the after images (default 1)")
    g.add_argument("--pair_width", type=int, default=64, help="built-in pairs: image width (default 64)")
    g.add_argument("--pair_height", type=int, default=64, help="built-in pairs: image height (default 64)")
    g.add_argument("--pair_steps", type=int, default=8, help="built-in pairs: sampling steps (default 8)")
    g.add_argument("--pair_guidance", type=float, default=3.5, help="built-in pairs: guidance (default 3.5)")
    g.add_argument("--fuse_precision", default="bf16", help="working copies: bf16, fp8 or float (default bf16)")
    g.add_argument("--combine_rank", type=int, default=None,
                   help="combine the rounds by SVD to this rank (default: exact, ranks concatenated)")
    g.add_argument("--keep_models", action="store_true", help="keep every round's fused working model")


def split_args(argv: Sequence[str], iterate: bool = False) -> tuple[DifferentialOptions, list[str], bool]:
    """(our options, the trainer's argv, --help asked); with `iterate`, the options are
    (DifferentialOptions, IterateOptions) and the first value is that pair."""
    argv = list(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = build_parser()
    if iterate:
        add_iterate_flags(parser)
    ns, rest = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    values = vars(ns)
    names = {f.name for f in dataclasses.fields(DifferentialOptions)}
    opts = DifferentialOptions(**{k: v for k, v in values.items() if k in names})
    if iterate:
        pair = (opts, IterateOptions(**{k: v for k, v in values.items() if k not in names}))
    for name in ("stage1_max_train_steps", "stage1_network_dim"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise UserError(f"command line: --{name} must be at least 1")
    if opts.stage1_learning_rate is not None and not opts.stage1_learning_rate > 0:
        raise UserError("command line: --stage1_learning_rate must be positive")
    return (pair if iterate else opts), rest, wants_help


def help_text(iterate: bool = False) -> str:
    parser = build_parser()
    if iterate:
        parser.prog, parser.description = "flux_enhance_iterate.py", (
            "Iterative enhancement: round 0 trains a differential LoRA on your pairs, each further round fuses the "
            "LoRAs so far into a working copy of the base, makes new pairs with it and trains the next one; the "
            "rounds are combined into one LoRA (docs/differential.md).")
        add_iterate_flags(parser)
    ours = parser.format_help()
    theirs = train_parser().format_help().split("\n\n", 2)[-1]  # the flag groups, without usage/description
    return ours + "\nflux_train_network.py flags (all passed through to both stages):\n\n" + theirs
