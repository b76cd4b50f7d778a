"""What flux_restore.py reports: PSNR/SSIM per image and in total (CSV), a side-by-side HTML page and PNG sheet.

Both the input (the degraded image) and the restored image are measured against the reference, at the output
size, so the CSV answers "how much did the LoRA restore?" (restored − input) and not just "how good is it?".
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from library.atomic import atomic_target, write_text_atomic
from library.restore.metrics import Totals, to_unit

CSV_FIELDS = ("image", "width", "height", "psnr_input", "ssim_input", "psnr_restored", "ssim_restored")


@dataclass(frozen=True)
class Row:
    name: str
    input: Path
    output: Path
    reference: Path
    width: int
    height: int
    psnr_input: float
    ssim_input: float
    psnr_restored: float
    ssim_restored: float


class Scores:
    """Per-image rows and the totals of the inputs and of the restored images (torchmetrics' reductions)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.inputs, self.restored = Totals(), Totals()

    def add(self, name: str, paths: tuple[Path, Path, Path], degraded: np.ndarray, restored: np.ndarray,
            reference: np.ndarray) -> Row:
        ref = to_unit(reference)
        p_in, s_in = self.inputs.add(to_unit(degraded), ref)
        p_out, s_out = self.restored.add(to_unit(restored), ref)
        h, w = reference.shape[:2]
        row = Row(name, *paths, w, h, p_in, s_in, p_out, s_out)
        self.rows.append(row)
        return row

    def summary(self) -> str:
        i, r = self.inputs, self.restored
        return (f"{len(self.rows)} image(s): PSNR {i.psnr:.2f} -> {r.psnr:.2f} dB ({r.psnr - i.psnr:+.2f}), "
                f"SSIM {i.ssim:.4f} -> {r.ssim:.4f} ({r.ssim - i.ssim:+.4f})")


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.6f}"


def write_csv(path: Path, scores: Scores) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in scores.rows:
        w.writerow([r.name, r.width, r.height, _num(r.psnr_input), _num(r.ssim_input), _num(r.psnr_restored),
                    _num(r.ssim_restored)])
    i, o = scores.inputs, scores.restored
    w.writerow(["TOTAL", "", "", _num(i.psnr), _num(i.ssim), _num(o.psnr), _num(o.ssim)])
    return write_text_atomic(path, buf.getvalue())


def write_html(path: Path, scores: Scores, title: str) -> Path:
    base = path.parent

    def img(p: Path) -> str:
        return f'<img src="{html.escape(Path(os.path.relpath(p, base)).as_posix())}" loading="lazy">'

    rows = "\n".join(
        f"<tr><td>{html.escape(r.name)}<br>PSNR {r.psnr_input:.2f} → <b>{r.psnr_restored:.2f}</b> dB<br>"
        f"SSIM {r.ssim_input:.4f} → <b>{r.ssim_restored:.4f}</b></td>"
        f"<td>{img(r.input)}</td><td>{img(r.output)}</td><td>{img(r.reference)}</td></tr>" for r in scores.rows)
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}img{max-width:384px}</style>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(scores.summary())}</p>"
            "<table><tr><th>image</th><th>input</th><th>restored</th><th>reference</th></tr>"
            f"{rows}</table>\n")
    return write_text_atomic(path, page)


def write_sheet(path: Path, triples: list[tuple[Image.Image, Image.Image, Image.Image]], thumb: int = 192,
                gap: int = 4) -> Path:
    """A PNG of rows input | restored | reference, each scaled to `thumb` pixels high."""
    cells = [[im.convert("RGB").resize((max(1, round(im.width * thumb / im.height)), thumb),
                                       Image.Resampling.LANCZOS) for im in t] for t in triples]
    width = max(sum(c.width for c in row) + gap * (len(row) + 1) for row in cells)
    sheet = Image.new("RGB", (width, len(cells) * (thumb + gap) + gap), (255, 255, 255))
    for r, row in enumerate(cells):
        x = gap
        for c in row:
            sheet.paste(c, (x, gap + r * (thumb + gap)))
            x += c.width + gap
    with atomic_target(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
