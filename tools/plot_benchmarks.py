"""Plots for BENCHMARKS.md from the JSON the device benchmarks return (rendered on the CPU, matplotlib).

    python tools/plot_benchmarks.py --curves curves.json --trainer trainer.json --out docs/img

writes `cost_curves.png` (step time and peak memory against resolution, LoRA rank and batch, from
tools/bench_train_step.py) and `loss_fast_vs_plain.png` (the trainer's per-step losses of two runs of
tools/bench_trainer.py on the same data and seed, named by --loss-runs).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _curves(results: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """{'resolution'|'rank'|'batch': [(x, median ms, peak GiB)]} from config names like 'eager ckpt 1024
    sdpa=default r64 b2' (rank 16 and batch 1 unless named)."""
    out: dict[str, list[tuple[int, float, float]]] = {"resolution": [], "rank": [], "batch": []}
    for r in results:
        if not r.get("ok"):
            continue
        m = re.search(r" (\d+) sdpa=\S+(?: r(\d+))?(?: b(\d+))?$", r["config"])
        if not m:
            continue
        res, rank, batch = int(m.group(1)), int(m.group(2) or 16), int(m.group(3) or 1)
        point = (r["median_ms"], r["peak_gib"])
        if rank == 16 and batch == 1:
            out["resolution"].append((res, *point))
        if res == 1024 and batch == 1:
            out["rank"].append((rank, *point))
        if res == 1024 and rank == 16:
            out["batch"].append((batch, *point))
    return {k: sorted(set(v)) for k, v in out.items()}


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, pts) in zip(axes, curves.items()):
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], "o-", color="tab:blue")
        ax.set_xlabel({"resolution": "resolution (px, square)", "rank": "LoRA rank (1024², batch 1)",
                       "batch": "batch size (1024², rank 16)"}[key])
        ax.set_ylabel("step time (ms)", color="tab:blue")
        if key == "rank":
            ax.set_xscale("log", base=2)
        ax2 = ax.twinx()
        ax2.plot(xs, [p[2] for p in pts], "s--", color="tab:red")
        ax2.set_ylabel("peak memory (GiB)", color="tab:red")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(runs: dict[str, list[float]], path: Path, title: str, reference: str | None = None,
                noise: str | None = None) -> None:
    """Left: the loss curves. Right (when `reference` is among the runs): each run minus `reference` step by
    step; `noise` (another seed of the reference configuration) shows what run-to-run noise looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = reference in runs and len(runs) > 1
    fig, axes = plt.subplots(1, 2 if diff else 1, figsize=(13 if diff else 8, 4), squeeze=False)
    ax = axes[0][0]
    for name, losses in runs.items():
        style = dict(color="0.6", linestyle="--") if name == noise else {}
        ax.plot(range(1, len(losses) + 1), losses, marker=".", label=name, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (trainer's loss CSV)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    if diff:
        ax = axes[0][1]
        ref = runs[reference]
        for name, losses in runs.items():
            if name == reference:
                continue
            d = [a - b for a, b in zip(losses, ref)]
            rms = (sum(v * v for v in d) / len(d)) ** 0.5
            style = dict(color="0.6", linestyle="--") if name == noise else {}
            ax.plot(range(1, len(d) + 1), d, marker=".", label=f"{name} − {reference} (RMS {rms:.3f})", **style)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel("loss difference")
        ax.set_title("difference to the plain run; dashed: another seed (run-to-run noise)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curves", type=Path, help="tools/bench_train_step.py --out JSON with the curve configs")
    ap.add_argument("--trainer", type=Path, help="tools/bench_trainer.py --out JSON")
    ap.add_argument("--loss-runs", nargs="+", default=["lossplain512", "lossfast512", "lossplain512seed2"],
                    help="runs to plot; the first is the reference of the difference panel, a name containing "
                         "'seed' is drawn as run-to-run noise")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.curves:
        data = json.loads(args.curves.read_text())
        plot_curves(data["results"], args.out / "cost_curves.png",
                    f"LoRA step cost, {data['info'].get('device', '?')} (tools/bench_train_step.py)")
    if args.trainer:
        data = json.loads(args.trainer.read_text())
        runs = {r["name"]: r["losses"] for r in data["results"] if r["name"] in args.loss_runs and r["losses"]}
        noise = next((n for n in args.loss_runs if "seed" in n), None)
        plot_losses(runs, args.out / "loss_fast_vs_plain.png",
                    f"flux_train_network.py, same data, {data['info'].get('device', '?')}",
                    reference=args.loss_runs[0], noise=noise)


if __name__ == "__main__":
    main()
