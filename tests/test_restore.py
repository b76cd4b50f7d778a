"""flux_restore.py end to end on the tiny models: outputs equal inference, batching, resume, metrics, --degrade."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_restore
from library.errors import UserError
from library.restore.metrics import psnr, ssim, to_unit
from library.sampling import read_png_settings
from tests.test_inference import BAR, psnr as psnr8

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "dataset_configs" / "data"
PROMPT = "Restore this photo"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """clean/ (3 photos: two 64x48, one 48x64) and degraded/ (their blurred, noisy copies, same stems)."""
    root = tmp_path_factory.mktemp("restore")
    (root / "clean").mkdir()
    (root / "degraded").mkdir()
    srcs = [("a", DATA / "dreambooth_dog" / "00.jpg", (64, 48)), ("b", DATA / "dreambooth_dog" / "01.jpg", (64, 48)),
            ("c", DATA / "clip_skimage_captioned" / "coffee.png", (48, 64))]
    rng = np.random.default_rng(0)
    for name, src, size in srcs:
        with Image.open(src) as im:
            clean = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        clean.save(root / "clean" / f"{name}.png")
        noisy = np.asarray(clean.resize((size[0] // 2, size[1] // 2)).resize(size), np.float64)
        noisy = np.clip(noisy + rng.normal(0, 10, noisy.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "degraded" / f"{name}.jpg", quality=95)
    return root


def base(ck, folders: Path, out: Path, *extra) -> list[str]:
    return ["--ckpt_path", str(ck.transformer), "--clip_l", str(ck.clip_l), "--t5xxl", str(ck.t5xxl),
            "--ae", str(ck.ae), "--input_dir", str(folders / "degraded"), "--output_dir", str(out),
            "--prompt", PROMPT, "--steps", "2", "--seed", "3", "--dtype", "fp32", "--device", "cpu",
            "--t5xxl_max_token_length", "16", *map(str, extra)]


@pytest.fixture(scope="module")
def restored(tiny_ckpts, folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("restored")
    assert flux_restore.main(base(tiny_ckpts, folders, out, "--batch_size", "2", "--reference_dir",
                                  folders / "clean")) == 0
    return out


def test_each_output_equals_inference_with_that_control_image(tiny_ckpts, folders, restored) -> None:
    """Batch of two 64x48 images + one 48x64 alone: each PNG is what generate_image gives for it alone."""
    from library.flux.loading import load_autoencoder, load_transformer
    from library.flux.text_encoders import FluxTextEncoders
    from library.sampling import generate_image, open_control_image

    tr = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    ae = load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32)
    te = FluxTextEncoders.load(tiny_ckpts.clip_l, tiny_ckpts.t5xxl, "cpu", torch.float32)
    images = {}
    for name in "abc":
        control = open_control_image(folders / "degraded" / f"{name}.jpg")
        ref = generate_image(tr, ae, te, PROMPT, control.width, control.height, 2, 2.5, 3, t5_max_length=16,
                             control=control, progress=False)
        images[name] = Image.open(restored / f"{name}.png").convert("RGB")
        assert images[name].size == control.size
        assert psnr8(images[name], ref) >= BAR, name
    plain = generate_image(tr, ae, te, PROMPT, 64, 48, 2, 2.5, 3, t5_max_length=16, progress=False)
    assert psnr8(images["a"], plain) < BAR  # the control image reaches the output
    meta = read_png_settings(restored / "a.png")
    assert (meta["control_image"], meta["prompt"], meta["steps"], meta["seed"]) == ("a.jpg", PROMPT, 2, 3)


def test_metrics_csv_gallery_and_totals(folders, restored) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    rows = list(csv.DictReader((restored / "metrics.csv").open()))
    assert [r["image"] for r in rows] == ["a", "b", "c", "TOTAL"]
    sse = n = 0.0
    for r in rows[:3]:
        out = to_unit(np.asarray(Image.open(restored / f"{r['image']}.png").convert("RGB")))
        ref = to_unit(np.asarray(Image.open(folders / "clean" / f"{r['image']}.png").convert("RGB")))
        deg = to_unit(np.asarray(Image.open(folders / "degraded" / f"{r['image']}.jpg").convert("RGB")))
        assert float(r["psnr_restored"]) == pytest.approx(float(peak_signal_noise_ratio(out, ref, data_range=1.0)),
                                                          abs=1e-4)
        assert float(r["ssim_restored"]) == pytest.approx(
            float(structural_similarity_index_measure(out, ref, data_range=1.0)), abs=1e-4)
        assert float(r["psnr_input"]) == pytest.approx(psnr(deg, ref), abs=1e-5)
        assert float(r["ssim_input"]) == pytest.approx(ssim(deg, ref), abs=1e-5)
        sse, n = sse + float(((out - ref) ** 2).sum()), n + out.numel()
    total = rows[3]
    assert float(total["psnr_restored"]) == pytest.approx(10 * np.log10(n / sse), abs=1e-4)
    assert float(total["ssim_restored"]) == pytest.approx(np.mean([float(r["ssim_restored"]) for r in rows[:3]]),
                                                          abs=1e-5)
    page = (restored / "gallery.html").read_text()
    assert page.count("<tr>") == 4 and "a.png" in page and "clean/a.png" in page
    with Image.open(restored / "gallery.png") as sheet:
        assert sheet.height > 3 * 192 and sheet.width > 3 * 192
    assert not list(restored.glob("*.tmp*")) and not list(restored.glob(".*"))


def test_resume_redoes_only_the_missing_and_refuses_other_settings(tiny_ckpts, folders, restored, tmp_path,
                                                                   capsys) -> None:
    out = tmp_path / "half"
    out.mkdir()
    for name in "ab":
        (out / f"{name}.png").write_bytes((restored / f"{name}.png").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert flux_restore.main(base(tiny_ckpts, folders, out)) == 0
    printed = capsys.readouterr().out
    assert "restored 1 image(s), kept 2" in printed
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before  # the done ones were not rewritten
    assert (out / "c.png").read_bytes() != b"" and psnr8(Image.open(out / "c.png"), Image.open(restored / "c.png")) \
        >= BAR
    with pytest.raises(UserError, match=re.escape(str(out / "a.png")) + ".*other settings"):
        flux_restore.main(base(tiny_ckpts, folders, out, "--guidance", "4.0"))


def test_degrade_first_then_measure_against_the_clean_inputs(tiny_ckpts, folders, tmp_path) -> None:
    from library.data.degrade import degrade, load_degradation_file
    from library.data.images import load_image

    cfg = tmp_path / "deg.toml"
    cfg.write_text('[degradation]\nops = ["downsample", "noise"]\ndownsample = [2, 3]\nnoise_sigma = [0.02, 0.05]\n')
    out = tmp_path / "out"
    argv = base(tiny_ckpts, folders, out, "--degrade", cfg)
    argv[argv.index("--input_dir") + 1] = str(folders / "clean")
    assert flux_restore.main(argv) == 0
    deg = load_degradation_file(cfg)
    for name in "abc":
        expected = degrade(load_image(folders / "clean" / f"{name}.png").rgb, deg, 3, f"{name}.png", 0)
        assert np.array_equal(np.asarray(Image.open(out / "degraded" / f"{name}.png")), expected)
        assert read_png_settings(out / f"{name}.png")["control_image"] == f"{name}.png"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4 and 10 < float(rows[0]["psnr_input"]) < 45  # degraded vs clean: a real difference


@pytest.mark.parametrize("change,expect", [
    (("--input_dir", "nowhere"), "nowhere: no such folder (given as --input_dir)"),
    (("--batch_size", "0"), "--batch_size 0: must be at least 1"),
    (("--degrade", "missing.toml"), "missing.toml: no such file (given as --degrade)"),
    (("--reference_dir", "EMPTY"), "no reference image named a.*"),
    (("--output_dir", "INPUT"), "--output_dir is the --input_dir"),
])
def test_bad_arguments_are_one_line_errors(tiny_ckpts, folders, tmp_path, change, expect) -> None:
    argv = base(tiny_ckpts, folders, tmp_path / "o")
    flag, value = change
    if value == "INPUT":
        value = str(folders / "degraded")
    if value == "EMPTY":
        (tmp_path / "empty").mkdir()
        value = str(tmp_path / "empty")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(UserError, match=re.escape(expect)) as err:
        flux_restore.main(argv)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))
