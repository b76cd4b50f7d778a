"""Loading the user's image/text models (transformers layout folders); nothing is ever downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def load_pretrained(folder: str | Path, flag: str, expected: tuple[str, ...], what: str, processor_cls: Any,
                    model_cls: Any, device: torch.device | None) -> tuple[Any, torch.nn.Module, torch.device]:
    """(processor, model in eval mode on `device` or the picked one, that device) from a transformers folder;
    the folder's model_type is checked before the (slow) load, and a load failure is one line."""
    model_type(folder, flag, expected)
    try:
        processor = processor_cls.from_pretrained(str(folder), local_files_only=True)
        model = model_cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: {flag}: cannot load {what} ({str(err).splitlines()[0][:200]})") from None
    device = device or pick_device()
    return processor, model.to(device).eval(), device


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]
