"""Frequency metrics of generated images; no model needed.

All work on the luminance (ITU-R BT.601 weights) in [0, 1], mean removed, times a 2-D Hann window (so the
image border does not leak a bright cross into the spectrum). P = |DFT|² / Σw² is the power spectrum;
frequencies are in cycles per pixel (0 … 0.5).

- `radial_spectrum`: P averaged over rings of equal |f| (n_bins rings over (0, 0.5]); plotted log-log,
  natural images fall roughly as 1/f², over-sharpened or noisy images lift the tail.
- `hf_energy`: the share of the (non-DC) power above `cutoff` cycles/px; `hf_ratio` is an image's share over
  the base model's image for the same prompt and seed (1 = unchanged, > 1 more high-frequency energy).
- `periodic_score`: the grid/stripe artifact of over-trained FLUX LoRAs repeats every 16 px (8 px AE stride ×
  2×2 latent patches). A pattern with an x-period of 16 puts its power on the columns fx = k/16 (k = 1 … 8)
  whatever its shape in y. We sum P over fy (the x-marginal), take the power at each k/16 bin and divide the
  total by the total of the local backgrounds (the median of bins 3 … 10 away on either side); the same
  in y; the score is the larger of the two. ≈ 1 for clean images; a planted grid gives ≫ 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LUMA = (0.299, 0.587, 0.114)
N_BINS = 64
HF_CUTOFF = 0.25  # cycles/px: the upper half of the frequency range
LATENT_PERIOD = 16  # px
BG_RADIUS = 5  # background of a lattice bin: the bins 2 … 5 away (Chebyshev distance)


def luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W] float64 in [0, 1] from a PIL image or an [H, W] / [H, W, 3] array of 0-255 values."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64) / 255.0
    return a if a.ndim == 2 else a[..., :3] @ np.array(LUMA)


def power_spectrum(gray: np.ndarray) -> np.ndarray:
    """Windowed power spectrum [H, W] in np.fft order (DC at [0, 0])."""
    h, w = gray.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    f = np.fft.fft2((gray - gray.mean()) * window)
    return (f.real ** 2 + f.imag ** 2) / (window ** 2).sum()


def _radius(shape: tuple[int, int]) -> np.ndarray:
    fy, fx = np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1])
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def radial_spectrum(gray: np.ndarray, n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(bin centre frequencies [n_bins], mean power per ring [n_bins]); empty rings are NaN."""
    p, r = power_spectrum(gray), _radius(gray.shape)
    edges = np.linspace(0.0, 0.5, n_bins + 1)
    idx = np.digitize(r, edges[1:-1], right=True)  # ring i holds edges[i] < r <= edges[i+1]
    keep = (r > 0) & (r <= 0.5)
    sums = np.bincount(idx[keep], weights=p[keep], minlength=n_bins)
    counts = np.bincount(idx[keep], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (edges[:-1] + edges[1:]) / 2, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def hf_energy(gray: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    p, r = power_spectrum(gray), _radius(gray.shape)
    total = p[r > 0].sum()
    return float(p[r > cutoff].sum() / total) if total > 0 else 0.0


def hf_ratio(gray: np.ndarray, base_gray: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    base = hf_energy(base_gray, cutoff)
    return float(hf_energy(gray, cutoff) / base) if base > 0 else float("nan")


def lattice_bins(n: int, period: int) -> list[int]:
    """The DFT bins (0 … n-1) of the frequencies k/period, k = 0 … period/2 and their negatives."""
    return sorted({int(round(k * n / period)) % n for k in range(-(period // 2), period // 2 + 1)})


def _background(p: np.ndarray, y: int, x: int) -> float:
    """The local mean power around (y, x), robustly: median of the ring 2 … BG_RADIUS bins away / ln 2.

    A periodogram bin of a smooth spectrum is exponentially distributed, so median / ln 2 estimates its
    mean without being pulled up by other peaks; the 3×3 centre is left out (the Hann window spreads a
    spike over it)."""
    h, w = p.shape
    ys = np.arange(y - BG_RADIUS, y + BG_RADIUS + 1) % h
    xs = np.arange(x - BG_RADIUS, x + BG_RADIUS + 1) % w
    block = p[np.ix_(ys, xs)]
    dy, dx = np.meshgrid(np.arange(-BG_RADIUS, BG_RADIUS + 1), np.arange(-BG_RADIUS, BG_RADIUS + 1), indexing="ij")
    ring = block[np.maximum(abs(dy), abs(dx)) >= 2]
    return float(np.median(ring) / np.log(2))


def periodic_score(gray: np.ndarray, period: int = LATENT_PERIOD) -> float:
    """Mean, over the frequencies (ky/period, kx/period) except DC, of power / local background power.

    ≈ 1 for a clean image (each bin is one draw of its local spectrum); a pattern repeating every `period` px
    lifts the lattice bins, and most at high frequencies, where a natural image has little power."""
    p = power_spectrum(gray)
    h, w = p.shape
    ratios = [p[y, x] / max(_background(p, y, x), 1e-30)
              for y in lattice_bins(h, period) for x in lattice_bins(w, period) if (y, x) != (0, 0)]
    return float(np.mean(ratios))
