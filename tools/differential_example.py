#!/usr/bin/env python
"""The tiny differential-LoRA example of docs/differential.md, end to end on the CPU (a few minutes on 2 cores).

Tiny seeded checkpoints; pairs from two shipped photos: "after" = a fixed warm colour grade, "before" = the
plain photo. Trains the differential LoRA (stage 1 on the befores, stage 2 on the afters), and the same with
before and after swapped, then samples the PLAIN base with each LoRA and prints how far the samples move
along the grade (0 = like the plain photos, 1 = like the graded ones, per the AE's latents).

    python tools/differential_example.py --out /tmp/diff_example
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="an empty or new folder for checkpoints, pairs, LoRAs, summary")
    p.add_argument("--seed", type=int, default=3, help="training seed (default 3)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: --out is not empty; give a new folder")
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from library.differential.example import grade_shift, train_grade_lora  # noqa: PLC0415
    from library.flux.tiny import write_tiny_checkpoints  # noqa: PLC0415

    t0 = time.perf_counter()
    ckpts = write_tiny_checkpoints(out / "checkpoints", seed=0, guidance_embed=True)
    summary = {}
    for swap in (False, True):
        name = "swapped" if swap else "graded"
        lora = train_grade_lora(ckpts, out / name, swap=swap, seed=a.seed)
        shifts = grade_shift(ckpts, out / name / "pairs", lora, axis_sign=-1.0 if swap else 1.0)
        moved = [w - b for b, w in shifts]
        summary[name] = {"lora": str(lora), "per_seed": [{"base": b, "with_lora": w} for b, w in shifts],
                         "mean_shift": sum(moved) / len(moved)}
        per_seed = ", ".join(f"{b:+.2f} -> {w:+.2f}" for b, w in shifts)
        print(f"{name}: {lora}\n  grade coordinate per seed (base -> with LoRA): {per_seed}\n"
              f"  mean shift {summary[name]['mean_shift']:+.3f}")
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
