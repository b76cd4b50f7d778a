#!/usr/bin/env python
"""Write tiny, seeded, random FLUX.1 checkpoints in every real layout (for tests and the README demo).

    python tools/make_tiny_checkpoints.py --out DIR [--seed N] [--schnell]

Writes DIR/flux1-tiny-{dev,schnell}.safetensors (BFL), DIR/ae.safetensors, DIR/clip_l.safetensors,
DIR/t5xxl_fp16.safetensors (ComfyUI) and DIR/FLUX.1-tiny-{dev,schnell}/ (a diffusers FluxPipeline folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from library.errors import UserError, run_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--schnell", action="store_true", help="FLUX.1-schnell layout (no guidance embedding)")
    args = parser.parse_args()
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out}: exists and is not a folder")
    from library.flux.tiny import write_tiny_checkpoints

    ckpts = write_tiny_checkpoints(args.out, seed=args.seed, guidance_embed=not args.schnell)
    for field in ("transformer", "ae", "clip_l", "t5xxl", "diffusers"):
        print(f"{field:12s} {getattr(ckpts, field)}")
    return 0


if __name__ == "__main__":
    run_main(main)
