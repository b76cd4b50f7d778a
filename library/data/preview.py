"""--dry_run's contact sheet: a few (target, control) pairs of each degraded subset in one PNG.

Each row is one (image, variant): the target as training sees it (bucket size, centre crop, no flip) and the
control image made from it, exactly as `FluxDataset._pixels` produces them, so a person can judge the
degradation strength before training. Written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from library.atomic import atomic_target
from library.data.dataset import FluxDataset
from library.data.scan import Item

THUMB = 192  # pixels, the longer side of each tile
LABEL = 14  # pixels of caption strip above each row


def preview_items(dataset: FluxDataset, per_subset: int = 4) -> list[Item]:
    """Up to `per_subset` items of every degraded subset: different images, variants 0, 1, 2, ... in turn."""
    out: list[Item] = []
    for its in dataset.items:
        by_subset: dict[int, list[Item]] = {}
        for it in its:
            if it.variant is not None and it.uid not in dataset.bad:
                by_subset.setdefault(it.subset, []).append(it)
        for mine in by_subset.values():
            paths = list(dict.fromkeys(it.path for it in mine))
            n_var = max(it.variant for it in mine) + 1
            want = [(paths[k % len(paths)], (k // len(paths) + k) % n_var) for k in range(per_subset)]
            chosen = {(it.path, it.variant): it for it in mine}
            out += list(dict.fromkeys(chosen[w] for w in want if w in chosen))
    return out


def _tile(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    scale = THUMB / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def contact_sheet(dataset: FluxDataset, items: list[Item]) -> Image.Image:
    """Rows of [target | control] with a label "subset d.s  name  variant v"."""
    rows = []
    for it in items:
        rgb, cond = dataset.pair(it)
        assert cond is not None
        rows.append((f"{it.dataset}.{it.subset}  {it.image_key}  variant {it.variant}", _tile(rgb), _tile(cond)))
    width = max(t.width + c.width for _, t, c in rows) + 12
    height = sum(t.height + LABEL + 6 for _, t, _ in rows) + 4
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    y = 2
    for label, target, control in rows:
        draw.text((4, y), f"{label}   (target | control)", fill=(230, 230, 230))
        sheet.paste(target, (4, y + LABEL))
        sheet.paste(control, (8 + target.width, y + LABEL))
        y += target.height + LABEL + 6
    return sheet


def write_degradation_preview(dataset: FluxDataset, out_dir: Path, per_subset: int = 4) -> Path | None:
    """`<out_dir>/degradation_preview.png` for the degraded subsets; None when there are none."""
    items = preview_items(dataset, per_subset)
    if not items:
        return None
    path = Path(out_dir) / "degradation_preview.png"
    sheet = contact_sheet(dataset, items)
    with atomic_target(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
