"""Write tiny seeded random CLIP and DINOv2 models in transformers layout (for the offline demo study and
tests; the scores they give mean nothing, the pipeline around them is the real one).

    python tools/make_tiny_eval_models.py --out demo_output/eval_models   # -> clip/, dino/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for clip/ and dino/")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    from library.eval.tiny_models import write_tiny_clip, write_tiny_dino  # noqa: PLC0415

    out = Path(a.out)
    print(write_tiny_clip(out / "clip", seed=a.seed))
    print(write_tiny_dino(out / "dino", seed=a.seed))
    return 0


if __name__ == "__main__":
    run_main(main)
