"""CLIP score, CLIP-I and DINO against their reference implementations; frequency metrics against a numpy
reference written independently (explicit DFT matrices and loops) and on planted patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_helpers import PHOTOS, photo, tiny_clip, tiny_dino  # noqa: F401 (fixtures)
from library.eval import frequency as F
from library.eval.clip import ClipScorer, clip_scores, mean_reference_similarity
from library.eval.dino import DinoEmbedder
from library.eval.prompts import apply_class_tokens, parse_class_token_map

LONG = "a photo of sks dog " + "sitting on a red chair in a sunny garden " * 12  # > 77 CLIP tokens
PROMPTS = ["a photo of sks dog", "a tabby cat on a sofa", LONG, "sks dog in the snow"]


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects `get_image_features` / `get_text_features` to return tensors; transformers 5
    returns an output object whose `pooler_output` is the projected embedding. This adapter hands
    torchmetrics the tensor, so its own code (preprocessing, truncation, formula) runs unchanged."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def _images(n=4, size=40):
    return [photo(p, size + 8 * i) for i, p in enumerate(PHOTOS[:n])]


def _reference_model(folder):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(folder)).eval(), CLIPProcessor.from_pretrained(str(folder))


def test_clip_score_equals_torchmetrics(tiny_clip):
    from torchmetrics.functional.multimodal import clip_score

    images = _images()
    mapping = parse_class_token_map(["sks dog=a dog"])
    scorer = ClipScorer(tiny_clip, torch.device("cpu"), batch_size=3)  # batches of 3: a split batch too
    texts = [apply_class_tokens(p, mapping) for p in PROMPTS]
    ours = clip_scores(scorer.image_embeds(images), scorer.text_embeds(texts))
    model, processor = _reference_model(tiny_clip)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]  # uint8 [3, H, W]
    ref = []
    for i, (image, text) in enumerate(zip(tensors, texts)):  # clip_score returns the batch mean: one at a time
        with pytest.warns(UserWarning, match="longer than") if text == texts[2] else _no_warning():
            ref.append(clip_score(image, text, model_name_or_path=lambda: (TensorFeatures(model), processor)))
    assert ours.shape == (4,) and bool((ours > 0).all()), ours  # not only clamped zeros
    torch.testing.assert_close(ours, torch.stack(ref).detach().float(), atol=1e-4, rtol=0)
    # a batch (padded to its longest prompt): torchmetrics clamps the batch mean, we clamp each image
    both = clip_score(tensors, texts, model_name_or_path=lambda: (TensorFeatures(model), processor))
    cos = torch.nn.functional.cosine_similarity(scorer.image_embeds(images), scorer.text_embeds(texts))
    assert float(both.detach()) == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-4)
    assert texts[0] == "a photo of a dog" and "sks" not in texts[3]
    # negative controls: without the replacement the scores differ; unwrapped, torchmetrics 1.9 breaks
    raw = torch.nn.functional.cosine_similarity(scorer.image_embeds(images), scorer.text_embeds(PROMPTS))
    # (the long prompt is cut before its end token, so the replacement inside it does not change the score)
    assert (raw - cos).abs()[[0, 3]].min() > 1e-4 and (raw - cos).abs()[1] == 0
    with pytest.raises((AttributeError, TypeError)):
        clip_score(tensors[:1], texts[:1], model_name_or_path=lambda: (model, processor))


def test_clip_score_is_clamped_at_zero():
    img, txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[-1.0, 0.2], [1.0, 1.0]])
    assert clip_scores(img, txt).tolist() == pytest.approx([0.0, 100 / 2 ** 0.5])


def test_clip_i_and_dino_equal_direct_transformers(tiny_clip, tiny_dino):
    from transformers import AutoImageProcessor, Dinov2Model

    images, refs = _images(3), _images(4, size=56)[1:]
    scorer = ClipScorer(tiny_clip, torch.device("cpu"))
    ours = mean_reference_similarity(scorer.image_embeds(images), scorer.image_embeds(refs))
    model, processor = _reference_model(tiny_clip)
    with torch.no_grad():
        e = model.get_image_features(**processor(images=images + refs, return_tensors="pt")).pooler_output
    e = torch.nn.functional.normalize(e, dim=-1)
    direct = torch.stack([torch.stack([e[i] @ e[3 + j] for j in range(3)]).mean() for i in range(3)])
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=0)

    dino = DinoEmbedder(tiny_dino, torch.device("cpu"))
    ours_d = mean_reference_similarity(dino.image_embeds(images), dino.image_embeds(refs))
    dm, dp = Dinov2Model.from_pretrained(str(tiny_dino)).eval(), AutoImageProcessor.from_pretrained(str(tiny_dino))
    with torch.no_grad():
        d = torch.nn.functional.normalize(dm(**dp(images=images + refs, return_tensors="pt")).pooler_output, dim=-1)
    direct_d = (d[:3] @ d[3:].T).mean(1)
    torch.testing.assert_close(ours_d, direct_d, atol=1e-5, rtol=0)
    assert not torch.allclose(ours_d, ours, atol=1e-3)  # two different models give different numbers


# ------------------------------------------------------------------------------------------ frequency


def _dft2(x: np.ndarray) -> np.ndarray:
    """The 2-D DFT as two explicit matrix products (no np.fft)."""
    h, w = x.shape
    mh = np.exp(-2j * np.pi * np.outer(np.arange(h), np.arange(h)) / h)
    mw = np.exp(-2j * np.pi * np.outer(np.arange(w), np.arange(w)) / w)
    return mh @ x @ mw.T


def _ref_power(gray):
    h, w = gray.shape
    win = np.array([[(0.5 - 0.5 * np.cos(2 * np.pi * i / (h - 1))) * (0.5 - 0.5 * np.cos(2 * np.pi * j / (w - 1)))
                     for j in range(w)] for i in range(h)])
    return np.abs(_dft2((gray - gray.mean()) * win)) ** 2 / (win ** 2).sum()


def _ref_freq(k, n):
    return (k if k < (n + 1) // 2 else k - n) / n


def test_frequency_metrics_equal_numpy_reference():
    rng = np.random.default_rng(0)
    gray = rng.random((48, 40)) + np.sin(np.arange(40) / 3.0)[None, :]
    p = _ref_power(gray)
    np.testing.assert_allclose(F.power_spectrum(gray), p, rtol=1e-9, atol=1e-12)
    n_bins = 8
    sums, counts, hf, total = np.zeros(n_bins), np.zeros(n_bins), 0.0, 0.0
    for y in range(48):
        for x in range(40):
            r = (_ref_freq(y, 48) ** 2 + _ref_freq(x, 40) ** 2) ** 0.5
            if r == 0:
                continue
            total += p[y, x]
            hf += p[y, x] if r > 0.25 else 0.0
            if r <= 0.5:
                b = min(n_bins - 1, int(np.ceil(r / (0.5 / n_bins))) - 1)
                sums[b] += p[y, x]
                counts[b] += 1
    freqs, radial = F.radial_spectrum(gray, n_bins)
    np.testing.assert_allclose(freqs, (np.arange(n_bins) + 0.5) * 0.5 / n_bins)
    np.testing.assert_allclose(radial, sums / counts, rtol=1e-9)
    assert F.hf_energy(gray) == pytest.approx(hf / total, rel=1e-9)
    # periodic score: the mean over lattice bins (k/16 on both axes, DC excluded) of power / background
    ratios = []
    for ky in sorted({round(k * 48 / 16) % 48 for k in range(-8, 9)}):
        for kx in sorted({round(k * 40 / 16) % 40 for k in range(-8, 9)}):
            if (ky, kx) == (0, 0):
                continue
            ring = [p[(ky + dy) % 48, (kx + dx) % 40] for dy in range(-5, 6) for dx in range(-5, 6)
                    if max(abs(dy), abs(dx)) >= 2]
            ratios.append(p[ky, kx] / (np.median(ring) / np.log(2)))
    assert F.periodic_score(gray) == pytest.approx(np.mean(ratios), rel=1e-9)
    assert F.hf_ratio(gray, gray) == pytest.approx(1.0)


def _grid(period: int, n: int = 512) -> np.ndarray:
    lines = (np.arange(n) % period == 0).astype(float)
    return np.clip(lines[None, :] + lines[:, None], 0, 1)


def test_periodic_score_detects_a_faint_16px_grid_only():
    amplitude = 2 / 255  # two 8-bit levels: hard to see, typical of early grid artifacts
    for path in PHOTOS:
        clean = F.luminance(photo(path, 512))
        s_clean = F.periodic_score(clean)
        s_16 = F.periodic_score(clean + amplitude * _grid(16))
        s_13 = F.periodic_score(clean + amplitude * _grid(13))
        assert s_clean < 1.6, path.name
        assert s_16 > 4.0, path.name
        assert s_13 < 1.6 and abs(s_13 - s_clean) < 0.1, path.name
    white = np.random.default_rng(1).random((512, 512))
    assert 0.8 < F.periodic_score(white) < 1.2


def test_hf_ratio_rises_with_added_noise():
    clean = F.luminance(photo(PHOTOS[0], 256))
    noisy = clean + np.random.default_rng(0).normal(0, 0.02, clean.shape)
    blurred = (clean + np.roll(clean, 1, 0) + np.roll(clean, 1, 1) + np.roll(clean, (1, 1), (0, 1))) / 4
    assert F.hf_ratio(noisy, clean) > 1.5
    assert F.hf_ratio(blurred, clean) < 0.7
