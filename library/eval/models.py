"""Loading the user's image/text models (transformers layout folders); nothing is ever downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from library.errors import UserError


def pick_device(name: str | None = None) -> torch.device:
    """--device, else the GPU when there is one (scoring batches on it), else the CPU."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def model_type(folder: str | Path, flag: str, expected: tuple[str, ...]) -> str:
    """The folder's config.json model_type, checked against `expected` (a one-line error otherwise)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"{folder}: {flag}: not a folder (give a transformers-layout model folder, e.g. a local "
                        "copy of openai/clip-vit-large-patch14)")
    if not config.is_file():
        raise UserError(f"{folder}: {flag}: no config.json (not a transformers-layout model folder)")
    try:
        kind = str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{config}: {flag}: config.json is not a JSON object") from None
    if kind not in expected:
        raise UserError(f"{config}: {flag}: model_type is {kind!r}, expected {' or '.join(map(repr, expected))}")
    return kind


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]
