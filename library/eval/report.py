"""The report: matplotlib plots of every metric against the training step (per LoRA and strength), a
comparison of LoRAs whose metadata differ (rank, resolution, study variant), the mean power spectra (base
vs each LoRA, log-log), and one HTML page with the plots and image grids (prompt × step, prompt × strength).

The page references only files inside the report folder (plots/, thumbs/), so the folder can be moved or
zipped and opened anywhere; nothing is fetched."""

from __future__ import annotations

import html
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from library.atomic import atomic_target, write_text_atomic
from library.errors import UserError
from library.eval.names import BASE
from library.eval.score import notes_path, spectra_path
from library.eval.table import ID_COLUMNS, read_rows
from library.sampling import read_png_settings

THUMB = 192  # px, the longer side of grid thumbnails
LABELS = {"clip_score": "CLIP score (100·cos, text)", "clip_i": "CLIP-I (cos to references)",
          "dino": "DINO (cos to references)", "hf_energy": "high-frequency energy share",
          "hf_ratio": "HF energy / base image's", "grid16": "16-px periodic-artifact score"}


def _mean(values: list[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def _pyplot():
    matplotlib.use("Agg")
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def metric_columns(columns: list[str], rows: list[dict]) -> list[str]:
    return [c for c in columns if c not in ID_COLUMNS and any(r.get(c) is not None for r in rows)]


def plot_vs_step(rows: list[dict], metric: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series: dict[tuple[str, float], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["lora"] != BASE and r.get(metric) is not None:
            series[r["lora"], r["strength"]][r["step"] or 0].append(r[metric])
    for (lora, strength), by_step in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        steps = sorted(by_step)
        ax.plot(steps, [_mean(by_step[s]) for s in steps], marker="o", label=f"{lora} @ {strength:g}")
    base = _mean([r.get(metric) for r in rows if r["lora"] == BASE])
    if math.isfinite(base):
        ax.axhline(base, color="gray", linestyle="--", label="base model")
    ax.set_xlabel("training step")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


COMPARED = ("network_dim", "resolution", "captions", "variant")


def lora_meta(images: Path | None, rows: list[dict]) -> dict[str, dict]:
    """network_dim / resolution / captions / variant per LoRA name, from the first PNG of each (render's
    metadata). captions = the caption_extension the LoRA's metadata records, else its study variant's name."""
    meta: dict[str, dict] = {}
    for r in rows:
        if r["lora"] in meta or r["lora"] == BASE or images is None or not (images / r["file"]).is_file():
            continue

        md = read_png_settings(images / r["file"])
        meta[r["lora"]] = {k: str(md.get(k, "")) for k in ("network_dim", "resolution", "variant")}
        meta[r["lora"]]["captions"] = str(md.get("caption_extension") or md.get("variant", ""))
    return meta


def differing_keys(meta: dict[str, dict]) -> list[str]:
    return [k for k in COMPARED if len({m.get(k, "") for m in meta.values()}) > 1]


def plot_comparison(rows: list[dict], metrics: list[str], meta: dict[str, dict], keys: list[str], path: Path) -> Path:
    """Each LoRA at its last step and highest strength: one bar per LoRA, one panel per metric."""
    plt = _pyplot()
    last: dict[str, tuple[int, float]] = {}
    for r in rows:
        if r["lora"] != BASE:
            last[r["lora"]] = max(last.get(r["lora"], (-1, -1.0)), (r["step"] or 0, r["strength"] or 0))
    loras = sorted(last)
    names = [f"{lo}\n" + ", ".join(f"{k.replace('network_dim', 'rank')}={meta.get(lo, {}).get(k, '?')}" for k in keys
                                   if not (k in ("variant", "captions") and meta.get(lo, {}).get(k) == lo))  # already the name
             for lo in loras]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [_mean([r.get(m) for r in rows if r["lora"] == lo and (r["step"] or 0, r["strength"] or 0) == last[lo]])
                for lo in loras]
        ax.bar(range(len(loras)), vals, color="tab:blue")
        ax.set_xticks(range(len(loras)), names, fontsize=6, rotation=30, ha="right")
        ax.set_title(LABELS.get(m, m), fontsize=8)
    fig.suptitle("LoRAs at their last step (by " + ", ".join(keys) + ")", fontsize=9)
    return _save(fig, path)


def plot_spectra(csv: Path, rows: list[dict], path: Path) -> Path | None:
    sp = spectra_path(csv)
    if not sp.is_file():
        return None
    data = np.load(sp)
    by_file = dict(zip([str(f) for f in data["files"]], data["spectra"]))
    freqs = data["freqs"]
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    last: dict[str, tuple] = {}
    for r in rows:
        if r["lora"] != BASE:
            last[r["lora"]] = max(last.get(r["lora"], (-1, -1.0)), (r["step"] or 0, r["strength"] or 0))
    for r in rows:
        key = BASE if r["lora"] == BASE else r["lora"] if (r["step"] or 0, r["strength"] or 0) == last[r["lora"]] else None
        if key and r["file"] in by_file:
            groups[key].append(by_file[r["file"]])
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, specs in sorted(groups.items(), key=lambda kv: kv[0] != BASE):
        with warnings.catch_warnings():  # rings without pixels in small images stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(np.stack(specs), axis=0)
        ok = np.isfinite(mean) & (mean > 0)
        ax.loglog(freqs[ok], mean[ok], label=name + (" (base model)" if name == BASE else " (last step)"),
                  color="black" if name == BASE else None, linestyle="--" if name == BASE else "-")
    ax.axvline(1 / 16, color="red", alpha=0.3, linewidth=0.8)
    ax.set_xlabel("frequency (cycles / px); red: 1/16")
    ax.set_ylabel("mean radial power")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _thumb(images: Path, file: str, out_dir: Path) -> str | None:
    src = images / file
    if not src.is_file():
        return None
    dst = out_dir / "thumbs" / file
    if not dst.exists():
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            with atomic_target(dst) as tmp:
                im.save(tmp, format="PNG")
    return f"thumbs/{html.escape(file)}"


def _grid_html(title: str, row_keys: list[str], col_keys: list, cell, col_label) -> str:
    head = "".join(f"<th>{html.escape(col_label(c))}</th>" for c in col_keys)
    body = []
    for rk in row_keys:
        cells = []
        for ck in col_keys:
            src = cell(rk, ck)
            cells.append(f'<td><img src="{src}" alt=""></td>' if src else "<td>–</td>")
        body.append(f"<tr><th>{html.escape(rk)}</th>{''.join(cells)}</tr>")
    return f"<h3>{html.escape(title)}</h3><table class=grid><tr><th>prompt</th>{head}</tr>{''.join(body)}</table>"


def grids(rows: list[dict], images: Path, out_dir: Path) -> list[str]:
    """Per LoRA: prompt × step at its highest strength, and prompt × strength at its last step (first seed)."""
    parts = []
    prompts = sorted({r["prompt_id"] for r in rows})
    seed = min((r["seed"] for r in rows if r["seed"] is not None), default=None)
    rows = [r for r in rows if r["seed"] == seed]
    index = {(r["lora"], r["step"], r["prompt_id"], r["strength"]): r["file"] for r in rows}
    base = {r["prompt_id"]: r["file"] for r in rows if r["lora"] == BASE}
    for lora in sorted({r["lora"] for r in rows} - {BASE}):
        mine = [r for r in rows if r["lora"] == lora]
        steps = sorted({r["step"] for r in mine}, key=lambda s: s or 0)
        strengths = sorted({r["strength"] for r in mine}, key=lambda s: s or 0)
        top, last = strengths[-1], steps[-1]

        def by_step(pid, step, lora=lora, top=top):
            f = index.get((lora, step, pid, top))
            return _thumb(images, f, out_dir) if f else None

        def by_strength(pid, s, lora=lora, last=last):
            f = base.get(pid) if s == 0 else index.get((lora, last, pid, s))
            return _thumb(images, f, out_dir) if f else None

        parts.append(_grid_html(f"{lora}: prompt × step (strength {top:g})", prompts, steps, by_step,
                                lambda s: f"step {s}"))
        parts.append(_grid_html(f"{lora}: prompt × strength (step {last})", prompts, [0.0] + strengths,
                                by_strength, lambda s: "base" if s == 0 else f"strength {s:g}"))
    return parts


def _summary_table(rows: list[dict], metrics: list[str]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["lora"], r["step"] or 0, r["strength"] or 0].append(r)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><td>{html.escape(k[0])}</td><td>{k[1]}</td><td>{k[2]:g}</td><td>{len(g)}</td>"
        + "".join(f"<td>{_mean([r.get(m) for r in g]):.4g}</td>" for m in metrics) + "</tr>"
        for k, g in sorted(groups.items()))
    return f"<table><tr><th>lora</th><th>step</th><th>strength</th><th>images</th>{head}</tr>{body}</table>"


def load_scores(csvs: list[Path]) -> tuple[list[str], list[dict], dict[str, str]]:
    columns: list[str] = []
    rows: list[dict] = []
    notes: dict[str, str] = {}
    for csv in csvs:
        cols, rs = read_rows(csv)
        columns += [c for c in cols if c not in columns]
        rows += rs
        n = notes_path(csv)
        if n.is_file():
            try:
                notes.update(json.loads(n.read_text(encoding="utf-8")))
            except json.JSONDecodeError:
                raise UserError(f"{n}: not valid JSON (written by `score`; rerun it)") from None
    if not rows:
        raise UserError(f"{csvs[0]}: --scores: no rows")
    return columns, rows, notes


def write_report(csvs: list[Path], images: Path | None, out_dir: Path) -> Path:
    columns, rows, notes = load_scores(csvs)
    images = images or csvs[0].parent / "images"
    metrics = metric_columns(columns, rows)
    plots = [plot_vs_step(rows, m, out_dir / "plots" / f"{m}_vs_step.png") for m in metrics]
    meta = lora_meta(images if images.is_dir() else None, rows)
    keys = differing_keys(meta)
    if keys and metrics:
        plots.append(plot_comparison(rows, metrics, meta, keys, out_dir / "plots" / "comparison.png"))
    spectra = plot_spectra(csvs[0], rows, out_dir / "plots" / "spectra.png")
    if spectra:
        plots.append(spectra)
    empty = [c for c in columns if c not in ID_COLUMNS and c not in metrics]
    why = "".join(f"<li><b>{html.escape(c)}</b>: {html.escape(notes.get(c, 'not computed'))}</li>" for c in empty)
    extra = [f"<li><b>{html.escape(c)}</b>: {html.escape(t)}</li>" for c, t in notes.items()
             if c in metrics and c.startswith("judge")]
    page = ["<!doctype html><html><head><meta charset=utf-8><title>LoRA evaluation</title><style>",
            "body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;margin:.5em 0}",
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px} table.grid img{display:block}",
            "</style></head><body><h1>LoRA evaluation</h1>",
            f"<p>{len(rows)} images from {', '.join(html.escape(c.name) for c in csvs)}. "
            "See docs/evaluation.md for what each metric means.</p>"]
    if why or extra:
        page.append(f"<h2>Empty or partial columns</h2><ul>{why}{''.join(extra)}</ul>")
    page += ["<h2>Summary (means over prompts and seeds)</h2>", _summary_table(rows, metrics), "<h2>Plots</h2>"]
    page += [f'<p><img src="plots/{p.name}" alt="{html.escape(p.stem)}"></p>' for p in plots]
    if images.is_dir():
        page += ["<h2>Image grids (first seed)</h2>", *grids(rows, images, out_dir)]
    page.append("</body></html>")
    return write_text_atomic(out_dir / "index.html", "\n".join(page))
