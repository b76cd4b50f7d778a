"""Plots for BENCHMARKS.md from the JSON the device benchmarks return (rendered on the CPU, matplotlib).

    python tools/plot_benchmarks.py --curves curves.json --trainer trainer.json --out docs/img

writes `cost_curves.png` (step time and peak memory against resolution, LoRA rank and batch, from
tools/bench_train_step.py) and `loss_fast_vs_plain.png` (the trainer's per-step losses of two runs of
tools/bench_trainer.py on the same data and seed, named by --loss-runs; `--loss-png` renames it), and with
`--samples DIR` (one folder of sample PNGs per run, as tools/bench_issue11_gpu_e.sh f copies them) a sheet of
every run's samples side by side, `samples_sheet.png`, printing each image's PSNR against the same image of
the `--sample-ref` run.

    python tools/plot_benchmarks.py --trainer trainer_f.json --loss-runs lossfast512 lossf8mm512 \
        lossplain512seed2 --loss-png loss_fp8_matmul.png --samples samples --sample-ref lossfast512 --out docs/img
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


def psnr(a, b) -> float:
    """PSNR in dB of two same-sized 8-bit images (PIL), over all channels."""
    import numpy as np

    x, y = (np.asarray(i.convert("RGB"), dtype=np.float64) for i in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def sample_sheet(folder: Path, path: Path, reference: str | None) -> list[tuple[str, str, float]]:
    """Rows: runs (subfolders); columns: their sample files, by name. Returns (run, file, PSNR vs reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    runs = sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.png")))
    names = sorted({f.name for d in runs for f in d.glob("*.png")})
    if not runs:
        raise SystemExit(f"{folder}: no run folders with PNG samples")
    rows = []
    fig, axes = plt.subplots(len(runs), len(names), figsize=(2.6 * len(names), 2.8 * len(runs)), squeeze=False)
    for i, d in enumerate(runs):
        for j, n in enumerate(names):
            ax = axes[i][j]
            ax.axis("off")
            if not (d / n).is_file():
                continue
            img = Image.open(d / n)
            label = d.name
            ref = folder / reference / n if reference else None
            if ref is not None and ref.is_file() and d.name != reference:
                value = psnr(img, Image.open(ref))
                rows.append((d.name, n, value))
                label += f"\nPSNR vs {reference} {value:.1f} dB"
            ax.imshow(img)
            ax.set_title(label + ("\n" + n[:28] if i == 0 else ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curves", type=Path, help="tools/bench_train_step.py --out JSON with the curve configs")
    ap.add_argument("--trainer", type=Path, help="tools/bench_trainer.py --out JSON")
    ap.add_argument("--loss-runs", nargs="+", default=["lossplain512", "lossfast512", "lossplain512seed2"],
                    help="runs to plot; the first is the reference of the difference panel, a name containing "
                         "'seed' is drawn as run-to-run noise")
    ap.add_argument("--loss-png", default="loss_fast_vs_plain.png", help="file name of the loss plot")
    ap.add_argument("--samples", type=Path, help="folder of per-run sample folders: writes samples_sheet.png")
    ap.add_argument("--sample-ref", default=None, help="run whose samples the PSNR is measured against")
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
        plot_losses(runs, args.out / args.loss_png,
                    f"flux_train_network.py, same data, {data['info'].get('device', '?')}",
                    reference=args.loss_runs[0], noise=noise)
    if args.samples:
        for run, name, value in sample_sheet(args.samples, args.out / "samples_sheet.png", args.sample_ref):
            print(f"{run} {name}: PSNR vs {args.sample_ref} {value:.2f} dB")


if __name__ == "__main__":
    main()
