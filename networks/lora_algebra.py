"""LoRA algebra: weighted sums and differences of LoRAs (`a - b`, `0.5·a + 0.5·b`), exact or SVD-compressed.

A LoRA is a set of updates ΔW_m = (alpha/rank) · up @ down, one per module m. A weighted combination
Σ_i c_i·LoRA_i means, per module, ΔW_m = Σ_i c_i·ΔW_{i,m} (a module missing from a file contributes 0).

- exact: the ranks are concatenated, down = [down_1; down_2; ...] and up = [c_1·s_1·up_1, c_2·s_2·up_2, ...]
  with s_i = alpha_i/rank_i, so up @ down = Σ c_i·ΔW_i exactly and the file's alpha = rank (scale 1).
- SVD: ΔW_m is truncated to `rank` singular values (Eckart–Young: the best rank-r approximation in
  Frobenius norm). The retained energy per module is ‖ΔW_r‖²_F / ‖ΔW‖²_F = Σ_{i<r} S_i² / Σ S_i², reported
  so a user sees what the compression cost.

kohya's merge sums downs and ups separately, which is not the sum of the updates; nothing here does that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from networks.lora_formats import LoRAWeight, read_lora
from networks.lora_svd import low_rank

Term = tuple[dict[str, LoRAWeight], float]  # (the modules of one LoRA, its coefficient)


@dataclass(frozen=True)
class Combined:
    weights: dict[str, LoRAWeight]
    energy: dict[str, float]  # SVD only: retained energy ‖ΔW_r‖²/‖ΔW‖² per module (exact: empty)


def read_terms(files: list[tuple[Path, float]]) -> list[Term]:
    """Each LoRA file (any supported format) with its coefficient; read_lora refuses a file with no module."""
    for path, c in files:
        if not math.isfinite(c):
            raise UserError(f"{path}: --ratios {c}: not a finite number")
    return [(read_lora(path).weights, c) for path, c in files]


def combined_delta(terms: list[Term], name: str) -> torch.Tensor:
    """Σ c_i·ΔW_i of one module (float32), the reference every combination is measured against."""
    parts = [w[name].delta() * c for w, c in terms if name in w]
    return torch.stack(parts).sum(0)


def _module_names(terms: list[Term]) -> list[str]:
    names = sorted({n for w, _ in terms for n in w})
    for n in names:
        shapes = {(tuple(w[n].up.shape[:1]), tuple(w[n].down.shape[1:])) for w, _ in terms if n in w}
        if len(shapes) > 1:
            raise UserError(f"{n}: the LoRAs disagree on the module's shape ({sorted(shapes)}); "
                            "they were trained for different models")
    return names


def concat(terms: list[Term], shuffle: bool = False, seed: int = 0) -> Combined:
    """Exact combination by rank concatenation (rank = Σ rank_i, alpha = rank)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in _module_names(terms):
        ws = [(w[name], c) for w, c in terms if name in w]
        down = torch.cat([w.down.float() for w, _ in ws])
        up = torch.cat([w.up.float() * (w.scale * c) for w, c in ws], dim=1)
        if shuffle:  # kohya's --shuffle: permute the rank order (same product)
            perm = torch.randperm(down.shape[0], generator=gen)
            down, up = down[perm], up[:, perm]
        out[name] = LoRAWeight(down.contiguous(), up.contiguous(), float(down.shape[0]))
    return Combined(out, {})


def svd(terms: list[Term], rank: int) -> Combined:
    """Combination compressed to `rank` per module by SVD of Σ c_i·ΔW_i, with the retained energy."""
    if rank < 1:
        raise UserError(f"--new_rank {rank}: must be >= 1")
    out, energy = {}, {}
    for name in _module_names(terms):
        lr = low_rank(combined_delta(terms, name), rank)
        out[name] = LoRAWeight(lr.down, lr.up, float(lr.rank))
        energy[name] = lr.retained ** 2
    return Combined(out, energy)


def combine(terms: list[Term], rank: int | None = None, shuffle: bool = False) -> Combined:
    """Σ c_i·LoRA_i: exact (rank None) or SVD to `rank`."""
    return concat(terms, shuffle) if rank is None else svd(terms, rank)


def effective_norm(w: LoRAWeight) -> float:
    """‖(alpha/rank) · up @ down‖_F without forming the product: sqrt(trace((upᵀup)(down downᵀ)))·scale."""
    up, down = w.up.double(), w.down.double()
    gram = (up.T @ up) * (down @ down.T)  # elementwise: Σ_ij (UᵀU)_ij (DDᵀ)_ij = ‖U D‖²_F
    return float(gram.sum().clamp_min(0).sqrt()) * abs(w.scale)


def energy_summary(energy: dict[str, float]) -> str:
    """One line: min / mean retained energy and the module that lost most."""
    if not energy:
        return "exact (no energy lost)"
    worst = min(energy, key=energy.get)
    mean = sum(energy.values()) / len(energy)
    return f"retained energy: mean {mean:.4f}, min {energy[worst]:.4f} ({worst}) over {len(energy)} modules"
