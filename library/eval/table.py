"""The scores CSV: one row per image, identifiers first (file, lora, step, prompt_id, seed, strength), then
one column per metric; an empty cell is a metric that was not computed for that image (the report says why)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from library.atomic import write_text_atomic
from library.errors import UserError

ID_COLUMNS = ("file", "lora", "step", "prompt_id", "seed", "strength")
INT_COLUMNS = ("step", "seed")


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_rows(path: str | Path, columns: list[str], rows: list[dict]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    return write_text_atomic(path, buf.getvalue())


def read_rows(path: str | Path) -> tuple[list[str], list[dict]]:
    """(columns, rows); ids typed (int step/seed, float strength), metrics float or None when empty."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: scores CSV not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in ID_COLUMNS if c not in columns]
        if missing:
            raise UserError(f"{path}: not a scores CSV (missing columns: {', '.join(missing)})")
        rows = []
        for i, raw in enumerate(reader, start=2):
            row: dict = {}
            for c in columns:
                v = raw.get(c) or ""
                try:
                    if c in ("file", "lora", "prompt_id"):
                        row[c] = v
                    elif c in INT_COLUMNS:
                        row[c] = int(v) if v else None
                    else:
                        row[c] = float(v) if v else None
                except ValueError:
                    raise UserError(f"{path}:{i}: column {c}: {v!r} is not a number") from None
            rows.append(row)
    return columns, rows
