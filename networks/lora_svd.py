"""Low-rank approximation of a weight delta by SVD, shared by the extract, resize and merge tools.

ΔW ≈ U_r diag(S_r) V_rᵀ (Eckart–Young: the best rank-r approximation in Frobenius norm). up = U_r diag(S_r),
down = V_rᵀ, alpha = r (scale 1). The retained norm ‖ΔW_r‖_F / ‖ΔW‖_F = sqrt(Σ_{i<r} S_i² / Σ S_i²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.errors import UserError

DTYPES = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, flag: str = "--save_precision", allow_fp8: bool = False) -> torch.dtype | None:
    if name is None:
        return None
    if allow_fp8 and name in ("fp8", "float8", "fp8_e4m3fn"):
        return torch.float8_e4m3fn
    if name not in DTYPES:
        raise UserError(f"{flag} {name}: expected one of {', '.join(sorted(DTYPES))}" + (", fp8" if allow_fp8 else ""))
    return DTYPES[name]


def check_svd_args(rank: tuple[str, int | None] | None = None, clamp_quantile: float | None = None,
                   method: str | None = None, param: float | None = None) -> None:
    """Reject ranks and criteria the SVD tools cannot honour (rank 0 used to become rank 1 silently)."""
    if rank is not None and rank[1] is not None and rank[1] < 1:
        raise UserError(f"{rank[0]} {rank[1]}: must be >= 1")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {clamp_quantile}: expected a quantile in (0, 1] (1.0: no clamping)")
    if method == "sv_ratio" and param is not None and not param >= 1:
        raise UserError(f"--dynamic_param {param}: sv_ratio keeps S_i >= S_0 / param, so param must be >= 1")
    if method in ("sv_fro", "sv_cumulative") and param is not None and not 0 < param <= 1:
        raise UserError(f"--dynamic_param {param}: {method} expects a fraction in (0, 1]")


@dataclass
class LowRank:
    up: torch.Tensor  # [out, r]
    down: torch.Tensor  # [r, in]
    retained: float  # ‖ΔW_r‖_F / ‖ΔW‖_F (before clamping)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None = None, method: str | None = None,
                param: float | None = None) -> int:
    """Rank from a cap and/or a criterion on the singular values `s` (descending).

    energy: smallest r keeping that fraction of Σ S² (the retained norm² ≥ energy).
    method (kohya resize_lora's dynamic methods): sv_ratio keeps S_i ≥ S_0 / param; sv_cumulative the
    smallest r with Σ_{i<r} S_i / Σ S ≥ param; sv_fro the smallest r with retained norm ≥ param.
    """
    n = s.numel()
    if n == 0 or float(s[0]) == 0.0:
        return 1
    r = n
    sq = s.double() ** 2
    if energy is not None:
        r = int((torch.cumsum(sq, 0) / sq.sum() < energy - 1e-12).sum()) + 1
    if method == "sv_ratio":
        r = int((s >= s[0] / param).sum())
    elif method == "sv_cumulative":
        r = int((torch.cumsum(s.double(), 0) / s.double().sum() < param - 1e-12).sum()) + 1
    elif method == "sv_fro":
        r = int((torch.sqrt(torch.cumsum(sq, 0) / sq.sum()) < param - 1e-12).sum()) + 1
    if rank is not None:
        r = min(r, rank)
    return max(1, min(r, n))


def low_rank(delta: torch.Tensor, rank: int | None, energy: float | None = None,
             clamp_quantile: float | None = None, method: str | None = None, param: float | None = None) -> LowRank:
    """Truncated SVD of `delta` [out, in] (float32 math)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = choose_rank(s, rank, energy, method, param)
    sq = s.double() ** 2
    retained = float(torch.sqrt(sq[:r].sum() / sq.sum())) if float(sq.sum()) > 0 else 1.0
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        # kohya's extraction clamps outliers of the factors (both at one symmetric bound)
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        if values.numel() > 16_000_000:  # torch.quantile's input limit
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:16_000_000]]
        hi = float(torch.quantile(values, clamp_quantile))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return LowRank(up.contiguous(), down.contiguous(), retained)
