"""library/restore/metrics.py equals torchmetrics (functional per image, modular over a set)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from library.restore import metrics as M

tm = pytest.importorskip("torchmetrics")
DATA = Path(__file__).resolve().parents[1] / "dataset_configs" / "data"


def pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed images: a photo vs its blurred, noised and JPEG'd copies, at two sizes (one odd)."""
    out = []
    for name, size in [("dreambooth_dog/00.jpg", (96, 64)), ("clip_skimage_captioned/coffee.png", (75, 53))]:
        with Image.open(DATA / name) as im:
            clean = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        blurred = clean.filter(ImageFilter.GaussianBlur(1.5))
        noise = np.random.default_rng(0).normal(0, 12, (size[1], size[0], 3))
        noisy = np.clip(np.asarray(clean, np.float64) + noise, 0, 255).astype(np.uint8)
        out += [(np.asarray(blurred), np.asarray(clean)), (noisy, np.asarray(clean))]
    return out


@pytest.mark.parametrize("i", range(4))
def test_per_image_equals_torchmetrics_functional(i) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred, target = (M.to_unit(a) for a in pairs()[i])
    assert M.psnr(pred, target) == pytest.approx(float(peak_signal_noise_ratio(pred, target, data_range=1.0)),
                                                 abs=1e-5)
    ref = float(structural_similarity_index_measure(pred, target, data_range=1.0))
    assert M.ssim(pred, target) == pytest.approx(ref, abs=1e-5)
    assert 0.2 < ref < 0.999  # a real, imperfect pair
    assert M.ssim(pred, target, sigma=1.0) != pytest.approx(ref, abs=1e-4)  # the window matters (control)


def test_totals_equal_torchmetrics_modular_metrics() -> None:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    tm_psnr, tm_ssim, totals = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0), \
        M.Totals()
    for a, b in pairs():
        pred, target = M.to_unit(a), M.to_unit(b)
        tm_psnr.update(pred, target)
        tm_ssim.update(pred, target)
        totals.add(pred, target)
    assert totals.psnr == pytest.approx(float(tm_psnr.compute()), abs=1e-5)
    assert totals.ssim == pytest.approx(float(tm_ssim.compute()), abs=1e-5)
    mean_of_psnrs = sum(p for p, _ in totals.per_image) / len(totals.per_image)
    assert abs(mean_of_psnrs - totals.psnr) > 0.05  # pooled MSE, not the mean of the PSNRs


def test_identical_images_and_shape_mismatch() -> None:
    a = M.to_unit(pairs()[0][1])
    assert M.psnr(a, a) == math.inf and M.ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        M.ssim(a, a[..., :-1])
    assert math.isnan(M.Totals().psnr)
