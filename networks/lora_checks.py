"""Checks of LoRA (and model) tensors before they are used or written: non-finite values, absurd magnitudes,
empty files, shapes that cannot be combined. Each failure is one line naming the file and the first bad
tensor, so a NaN LoRA never turns into an all-black image or a checkpoint of NaNs."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from library.errors import UserError

ABSURD = 1e4  # no trained LoRA factor comes near this; fp16 overflows at 65504


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, "nan" | "inf") of the first tensor (in name order) holding a non-finite value, else None."""
    for name in sorted(tensors):
        t = tensors[name]
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if torch.isnan(t).any():
            return name, "nan"
        if torch.isinf(t).any():
            return name, "inf"
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, what: str = "") -> None:
    bad = first_non_finite(tensors)
    if bad:
        raise UserError(f"{where}: {what}tensor {bad[0]!r} holds {bad[1]} values; refusing to use or write "
                        "non-finite weights (was the training diverging?)")


def lora_tensors(weights: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """{kohya key: tensor} of parsed LoRAWeights (down, up and alpha), for the checks above."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        out[f"{name}.lora_down.weight"] = w.down  # type: ignore[attr-defined]
        out[f"{name}.lora_up.weight"] = w.up  # type: ignore[attr-defined]
        if w.alpha is not None:  # type: ignore[attr-defined]
            out[f"{name}.alpha"] = torch.tensor(float(w.alpha))  # type: ignore[attr-defined]
    return out


def absurd_tensors(tensors: Mapping[str, torch.Tensor], limit: float = ABSURD) -> list[str]:
    """Names of finite tensors with a value beyond ±limit (a LoRA that will blow up any image)."""
    return [n for n in sorted(tensors) if tensors[n].is_floating_point() and tensors[n].numel()
            and torch.isfinite(tensors[n]).all() and float(tensors[n].abs().max()) > limit]


def check_number(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise UserError(f"command line: {flag} {value}: must be a finite number")


def check_numbers(values: Iterable[float] | None, flag: str) -> None:
    for v in values or []:
        check_number(v, flag)


def check_combinable(parsed: list[tuple[str, Mapping[str, object]]]) -> None:
    """The same module in several LoRAs must have the same in/out sizes (one base model)."""
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for path, weights in parsed:
        for name, w in weights.items():
            size = (int(w.up.shape[0]), int(w.down.shape[1]))  # type: ignore[attr-defined]
            if name in seen and seen[name][1] != size:
                raise UserError(f"{path}: module {name} is {size[0]}x{size[1]} but {seen[name][1][0]}x"
                                f"{seen[name][1][1]} in {seen[name][0]}: these LoRAs are for different models")
            seen.setdefault(name, (path, size))
