#!/usr/bin/env python
"""The tiny differential-LoRA example of docs/differential.md, end to end on the CPU (a few minutes on 2 cores).

Tiny seeded checkpoints; pairs from two shipped photos: "after" = a fixed warm colour grade, "before" = the
plain photo. Trains the differential LoRA (stage 1 on the befores, stage 2 on the afters), and the same with
before and after swapped, each with its null twin (stage 2 on identical pairs, same stage 1 and noise), for
training seeds 0-4; then samples the PLAIN base with each LoRA and prints how far the LoRA moves the one-step
samples along the grade beyond its twin (0 = like the plain photos, 1 = like the graded ones, per the AE's
latents; library/differential/example.grade_effect).

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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (default 0-4)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: --out is not empty; give a new folder")
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from library.differential.example import grade_effect, train_grade_loras  # noqa: PLC0415
    from library.flux.tiny import write_tiny_checkpoints  # noqa: PLC0415

    t0 = time.perf_counter()
    ckpts = write_tiny_checkpoints(out / "checkpoints", seed=0, guidance_embed=True)
    summary: dict = {}
    for swap in (False, True):
        name = "swapped" if swap else "graded"
        for seed in a.seeds:
            lora, null = train_grade_loras(ckpts, out / name / str(seed), swap=swap, seed=seed)
            effect = grade_effect(ckpts, out / name / str(seed), lora, null)
            mean = sum(effect) / len(effect)
            summary.setdefault(name, {})[seed] = {"lora": str(lora), "null": str(null), "per_sampling_seed": effect,
                                                  "mean": mean}
            print(f"{name}, training seed {seed}: grade effect per sampling seed "
                  f"{', '.join(f'{e:+.2f}' for e in effect)}; mean {mean:+.3f}", flush=True)
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
