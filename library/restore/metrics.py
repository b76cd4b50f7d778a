"""PSNR and SSIM with torchmetrics' definitions, written out (tests compare with torchmetrics.functional).

Images are float64 [1, 3, H, W] in [0, 1] (8-bit images / 255), data range 1.

- PSNR = 10·log10(1 / MSE). Over a set, as torchmetrics' `PeakSignalNoiseRatio` accumulates: the PSNR of
  the pooled MSE (Σ squared errors / Σ values), not the mean of the per-image PSNRs.
- SSIM (Wang et al. 2004) as `structural_similarity_index_measure`: Gaussian window σ = 1.5, size
  2·int(3.5σ + 0.5) + 1 = 11, K1 = 0.01, K2 = 0.03, images reflect-padded by 5 so the SSIM map has the image's
  size, variances clamped at 0, the map averaged over channels and pixels. Over a set: the mean of the
  per-image values (torchmetrics' `StructuralSimilarityIndexMeasure`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float64 [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1)[None] / 255.0


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """(Σ (pred − target)², number of values)."""
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return float(((pred - target) ** 2).sum()), pred.numel()


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    sse, n = squared_error(pred, target)
    return psnr_from_mse(sse / n)


def _gaussian_window(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    size = int(3.5 * sigma + 0.5) * 2 + 1
    d = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=dtype)
    g = torch.exp(-((d / sigma) ** 2) / 2)
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor, sigma: float = SSIM_SIGMA) -> float:
    """Mean SSIM of two [1, C, H, W] images in [0, 1]."""
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    c = pred.shape[1]
    window = _gaussian_window(sigma, pred.dtype)
    pad = (window.shape[0] - 1) // 2
    x = F.pad(pred, (pad,) * 4, mode="reflect")
    y = F.pad(target, (pad,) * 4, mode="reflect")
    kernel = window.expand(c, 1, *window.shape)
    mu_x, mu_y, xx, yy, xy = F.conv2d(torch.cat((x, y, x * x, y * y, x * y)), kernel, groups=c).split(1)
    var_x = (xx - mu_x**2).clamp(min=0)
    var_y = (yy - mu_y**2).clamp(min=0)
    cov = xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


@dataclass
class Totals:
    """Running totals over a set of images, reduced as torchmetrics' modular metrics reduce them."""

    sse: float = 0.0
    count: int = 0
    ssim_sum: float = 0.0
    images: int = 0
    per_image: list[tuple[float, float]] = field(default_factory=list)

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
        sse, n = squared_error(pred, target)
        value = (psnr_from_mse(sse / n), ssim(pred, target))
        self.sse, self.count = self.sse + sse, self.count + n
        self.ssim_sum, self.images = self.ssim_sum + value[1], self.images + 1
        self.per_image.append(value)
        return value

    @property
    def psnr(self) -> float:
        return psnr_from_mse(self.sse / self.count) if self.count else math.nan

    @property
    def ssim(self) -> float:
        return self.ssim_sum / self.images if self.images else math.nan
