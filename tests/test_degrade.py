"""Degradation ops against independent references (PIL, scipy, numpy formulas); seeded parameters; the parser."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from library.data import degrade as D
from library.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "dataset_configs" / "data" / "clip_skimage_captioned" / "chelsea.png"


@pytest.fixture(scope="module")
def u8() -> np.ndarray:
    with Image.open(PHOTO) as im:
        return np.asarray(im.convert("RGB").resize((96, 64), Image.Resampling.BOX))


def _f(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 255.0


def test_downsample_equals_pil_down_then_up(u8):
    for interp, flt in (("bicubic", Image.Resampling.BICUBIC), ("nearest", Image.Resampling.NEAREST),
                        ("lanczos", Image.Resampling.LANCZOS)):
        ref = np.asarray(Image.fromarray(u8).resize((32, 21), flt).resize((96, 64), flt))
        out = D.apply_params(u8, D.DegradationParams((D.Downsample(3.0, interp),)))
        np.testing.assert_array_equal(out, ref)
    assert np.abs(out.astype(int) - u8).mean() > 2  # it does change the image


def test_blur_equals_scipy_gaussian_filter(u8):
    for sigma in (0.7, 2.5):
        ref = np.stack([ndimage.gaussian_filter(_f(u8)[..., c].astype(np.float64), sigma, mode="reflect",
                                                truncate=4.0) for c in range(3)], -1)
        np.testing.assert_allclose(D.blur(_f(u8), sigma), ref, atol=1e-5)
    wrong = ndimage.gaussian_filter(_f(u8)[..., 0].astype(np.float64), 2.0, mode="reflect")
    assert np.abs(D.blur(_f(u8), 2.5)[..., 0] - wrong).max() > 1e-2  # negative control: another sigma differs


def test_noise_gaussian_and_poisson_formulas(u8):
    x = _f(u8)
    z = np.random.default_rng(123).standard_normal(x.shape, dtype=np.float32)
    np.testing.assert_allclose(D.noise(x, "gaussian", 0.05, 123), np.clip(x + 0.05 * z, 0, 1), atol=1e-6)
    p = np.random.default_rng(7).poisson(x.astype(np.float64) * 40.0) / 40.0
    np.testing.assert_allclose(D.noise(x, "poisson", 40.0, 7), np.clip(p, 0, 1), atol=1e-6)
    # shot noise: the variance grows with the signal (Var = x / peak)
    flat = np.full((200, 200, 3), 0.5, np.float32)
    assert abs(D.noise(flat, "poisson", 40.0, 1).var() - 0.5 / 40.0) < 0.1 * 0.5 / 40.0
    assert abs(D.noise(flat, "gaussian", 0.05, 1).std() - 0.05) < 0.002


def test_jpeg_equals_pil_round_trip(u8):
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=35)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    out = D.apply_params(u8, D.DegradationParams((D.Jpeg(35),)))
    np.testing.assert_array_equal(out, ref)
    assert not np.array_equal(out, D.apply_params(u8, D.DegradationParams((D.Jpeg(90),))))


def test_color_fade_formula(u8):
    x = _f(u8).astype(np.float64)
    s, c, y = 0.4, 0.3, 0.5
    luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    a = luma[..., None] * s + x * (1 - s)
    la = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    b = la.mean() * c + a * (1 - c)
    ref = np.clip(b * np.array([1.0, 1 - 0.1 * y, 1 - 0.4 * y]), 0, 1)
    np.testing.assert_allclose(D.color_fade(_f(u8), s, c, y), ref, atol=1e-5)
    out = D.color_fade(_f(u8), 1.0, 0.0, 0.0)  # full saturation loss = grayscale
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)
    assert D.color_fade(_f(u8), 0, 0, 1.0)[..., 2].mean() < _f(u8)[..., 2].mean() * 0.7  # yellowing cuts blue


def test_grayscale_equals_pil_L(u8):
    ref = np.asarray(Image.fromarray(u8).convert("L")).astype(int)
    out = D.apply_params(u8, D.DegradationParams((D.Grayscale(True),)))
    assert np.abs(out[..., 0].astype(int) - ref).max() <= 1  # PIL rounds in fixed point
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(D.apply_params(u8, D.DegradationParams((D.Grayscale(False),))), u8)


def test_scratches_blend_a_pil_line_mask(u8):
    stroke = D.Stroke((0.1, 0.2), (0.9, 0.7), 2, 1.0, 0.8)
    out = D.scratches(_f(u8), (stroke,))
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).line([(9.6, 12.8), (86.4, 44.8)], fill=255, width=2)
    m = np.asarray(mask) > 0
    assert 100 < m.sum() < 400  # a thin stroke: about 2 px x 80 px
    np.testing.assert_allclose(out[m], _f(u8)[m] + 0.8 * (1.0 - _f(u8)[m]), atol=1e-6)
    np.testing.assert_array_equal(out[~m], _f(u8)[~m])  # every other pixel untouched


CFG = D.DegradationConfig(ops=("downsample", "blur", "noise", "jpeg", "color_fade", "scratches", "grayscale"),
                          variants=3, grayscale_prob=0.5)


def test_params_are_a_function_of_seed_image_variant():
    a = D.sample_params(CFG, 5, "a.png", 0)
    assert a == D.sample_params(CFG, 5, "a.png", 0)
    assert a != D.sample_params(CFG, 5, "a.png", 1)
    assert a != D.sample_params(CFG, 5, "b.png", 0)
    assert a != D.sample_params(CFG, 6, "a.png", 0)
    assert D.sample_params(replace(CFG, seed=9), 5, "a.png", 0) == D.sample_params(replace(CFG, seed=9), 6, "a.png", 0)
    # each op has its own generator: a changed blur range leaves the other draws alone
    b = D.sample_params(replace(CFG, blur_sigma=(3.0, 4.0)), 5, "a.png", 0)
    assert [p for p in a.ops if not isinstance(p, D.Blur)] == [p for p in b.ops if not isinstance(p, D.Blur)]
    assert a.ops[1] != b.ops[1] and 3.0 <= b.ops[1].sigma <= 4.0
    json.dumps(a.describe())  # hashable into a cache key


def test_params_equal_across_processes(u8):
    code = ("import json; from library.data import degrade as D; "
            f"cfg = D.DegradationConfig(ops={CFG.ops!r}, variants=3, grayscale_prob=0.5); "
            "print(json.dumps([D.sample_params(cfg, 5, 'a.png', v).describe() for v in range(3)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "17", "PATH": ""})
    here = [D.sample_params(CFG, 5, "a.png", v).describe() for v in range(3)]
    assert json.loads(out.stdout) == json.loads(json.dumps(here))


def test_degrade_reproducible_and_keeps_type(u8):
    a = D.degrade(u8, CFG, 1, "k", 2)
    np.testing.assert_array_equal(a, D.degrade(u8, CFG, 1, "k", 2))
    assert a.shape == u8.shape and a.dtype == np.uint8
    assert not np.array_equal(a, D.degrade(u8, CFG, 1, "k", 1))
    pil = D.degrade(Image.fromarray(u8), CFG, 1, "k", 2)
    assert isinstance(pil, Image.Image) and np.array_equal(np.asarray(pil), a)


def test_parser_accepts_the_issue_example():
    cfg, errors = D.parse_degradation({"ops": ["downsample", "blur", "noise", "jpeg"], "downsample": [2, 8],
                                       "blur_sigma": [0.0, 2.5], "noise_sigma": [0.0, 0.06],
                                       "jpeg_quality": [30, 90], "variants": 4}, "d")
    assert errors == [] and cfg.variants == 4 and cfg.downsample == (2.0, 8.0) and cfg.jpeg_quality == (30, 90)
    assert D.parse_degradation({"ops": ["blur"], "blur_sigma": 1.5}, "d")[0].blur_sigma == (1.5, 1.5)


@pytest.mark.parametrize("table, expected", [
    ({"ops": ["blur"], "blur_sgma": [0, 1]}, "d.blur_sgma: unknown key; did you mean blur_sigma?"),
    ({"ops": ["blurr"]}, "d.ops: unknown op 'blurr'; did you mean blur?"),
    ({"ops": ["blur"], "blur_sigma": [2, 1]}, "d.blur_sigma: min > max"),
    ({"ops": ["blur"], "variants": 0}, "d.variants: expected an integer >= 1, got 0"),
    ({"ops": ["jpeg"], "jpeg_quality": [30.5, 90]}, "d.jpeg_quality: expected [low, high] (integers)"),
    ({"ops": ["noise"], "noise_sigma": "0.1"}, "d.noise_sigma: expected [low, high]"),
    ({"ops": ["noise"], "noise_type": "salt"}, "d.noise_type: expected one of gaussian, poisson"),
    ({"ops": ["blur"], "jpeg_quality": [30, 90]}, "d.jpeg_quality: set, but 'jpeg' is not in ops"),
    ({"blur_sigma": [0, 1]}, "d.ops: missing"),
    ({"ops": ["blur", "blur"]}, "d.ops: op 'blur' is listed twice"),
    ({"ops": ["jpeg"], "jpeg_quality": [0, 90]}, "d.jpeg_quality: must lie in [1, 100]"),
])
def test_parser_rejects(table, expected):
    cfg, errors = D.parse_degradation(table, "d")
    assert cfg is None and any(e.startswith(expected) for e in errors), errors


def test_load_degradation_file(tmp_path):
    f = tmp_path / "deg.toml"
    f.write_text('[degradation]\nops = ["downsample", "noise"]\nnoise_type = "poisson"\nnoise_peak = [20, 80]\n')
    assert D.load_degradation_file(f).noise_peak == (20.0, 80.0)
    f.write_text('[degradation]\nops = ["noise"]\nnoise_sigm = [0, 1]\n')
    with pytest.raises(UserError, match=r"deg.toml: degradation.noise_sigm: unknown key; did you mean noise_sigma"):
        D.load_degradation_file(f)
    with pytest.raises(UserError, match="not found"):
        D.load_degradation_file(tmp_path / "nope.toml")
