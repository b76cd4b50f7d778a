"""Kontext inference (a control image) against diffusers' FluxKontextPipeline on the same tiny weights.

The tiny model here has its attention sharpened (QK-norm scales × 4, the same weights in both layouts), so
the output depends on the reference image's content and positions, not just on its presence: with the
stock tiny weights a mirrored reference still scores 50 dB and the negative controls could not fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.flux.loading import load_autoencoder, load_transformer
from library.flux.model import to_fp8
from library.flux.text_encoders import FluxTextEncoders
from library.objective import Objective
from library import sampling as S
from tests.test_inference import BAR, psnr

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
CASE = dict(prompt="restore this old photo", width=128, height=80, steps=4, guidance=3.5, seed=7)
SHARPEN = 4.0


@pytest.fixture(scope="module")
def kontext(tiny_ckpts, tmp_path_factory):
    """(BFL transformer file, diffusers folder) of the sharpened tiny model."""
    from safetensors.torch import load_file

    from library.flux.convert import transformer_bfl_to_diffusers
    from library.flux.safetensors_io import save_file_atomic

    root = tmp_path_factory.mktemp("kontext")
    sd = load_file(str(tiny_ckpts.transformer))
    for k in sd:
        if k.endswith(("query_norm.scale", "key_norm.scale")):
            sd[k] = sd[k] * SHARPEN
    bfl = root / "flux1-tiny-kontext.safetensors"
    save_file_atomic(sd, bfl, metadata={"format": "pt"})
    folder = root / "FLUX.1-tiny-kontext"
    shutil.copytree(tiny_ckpts.diffusers, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"))
    save_file_atomic(transformer_bfl_to_diffusers(sd), folder / "transformer" / "diffusion_pytorch_model.safetensors")
    shutil.copy(tiny_ckpts.diffusers / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae")
    return bfl, folder


@pytest.fixture(scope="module")
def control() -> Image.Image:
    with Image.open(ROOT / "dataset_configs" / "data" / "dreambooth_dog" / "00.jpg") as im:
        return im.convert("RGB").resize((CASE["width"], CASE["height"]), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def pipe(kontext):
    from diffusers import FluxKontextPipeline

    p = FluxKontextPipeline.from_pretrained(str(kontext[1]), dtype=torch.float32, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def kontext_pipeline_image(pipe, image: Image.Image, **case) -> Image.Image:
    w, h = case["width"], case["height"]
    return pipe(image=image, prompt=case["prompt"], width=w, height=h, num_inference_steps=case["steps"],
                guidance_scale=case["guidance"], generator=torch.Generator("cpu").manual_seed(case["seed"]),
                _auto_resize=False, max_area=w * h).images[0]


@pytest.fixture(scope="module")
def models(kontext, tiny_ckpts):
    bfl, folder = kontext
    return (load_transformer(bfl, "cpu", torch.float32), load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32),
            FluxTextEncoders.load(tiny_ckpts.clip_l, tiny_ckpts.t5xxl, "cpu", torch.float32))


@pytest.fixture(scope="module")
def reference(pipe, control) -> Image.Image:
    return kontext_pipeline_image(pipe, control, **CASE)


def ours(models, control, **kw) -> Image.Image:
    transformer, ae, te = models
    return S.generate_image(transformer, ae, te, **{**CASE, **kw}, control=control, progress=False)


def test_control_image_equals_diffusers_kontext_pipeline(models, control, reference) -> None:
    image = ours(models, control)
    assert image.size == (CASE["width"], CASE["height"])
    assert psnr(image, reference) >= BAR
    assert np.asarray(reference).std() > 20


def test_no_mirrored_or_misplaced_reference_breaks_the_bar(models, control, reference, monkeypatch) -> None:
    transformer, ae, te = models
    plain = S.generate_image(transformer, ae, te, **CASE, progress=False)  # no reference image at all
    mirrored = ours(models, control.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    original = S.make_img_ids
    monkeypatch.setattr(S, "make_img_ids", lambda b, h, w, index=0: original(b, h, w, 0))  # references on axis 0
    misplaced = ours(models, control)
    monkeypatch.undo()
    for name, image in [("no reference", plain), ("mirrored", mirrored), ("position axis 0", misplaced)]:
        value = psnr(image, reference)
        assert value < BAR - 5, f"{name}: {value:.1f} dB"


def test_control_resize_none_keeps_its_own_size_like_diffusers(models, pipe) -> None:
    """--control_resize none: a 112x96 reference for a 128x80 output stays 112x96 (7x6 tokens), as diffusers'
    pipeline with _auto_resize=False does; the default resizes it to the output size instead."""
    with Image.open(ROOT / "dataset_configs" / "data" / "dreambooth_dog" / "01.jpg") as im:
        other = im.convert("RGB").resize((112, 96), Image.Resampling.BICUBIC)
    case = {**CASE, "steps": 2}
    ref = kontext_pipeline_image(pipe, other, **case)
    assert psnr(ours(models, other, control_resize=False, steps=2), ref) >= BAR
    assert psnr(ours(models, other, steps=2), ref) < BAR - 5
    assert S.control_pixels(other, 128, 80, resize=False).shape == (1, 3, 96, 112)
    assert S.control_pixels(other, 128, 80).shape == (1, 3, 80, 128)


def test_flow_from_control_starts_from_the_noised_control(models, control) -> None:
    """A flow_from_control LoRA: sampling starts at x_1 = control + std * the seed's noise, without reference
    tokens unless it was trained with them."""
    transformer, ae, te = models
    s = S.sample_settings(True, CASE["prompt"], CASE["width"], CASE["height"], 3, 3.5, 7,
                          objective=Objective("flow_from_control", 0.5, False))
    cond = te.encode([s.prompt], s.t5_max_length)
    c = S.encode_control(ae, control, s.width, s.height)
    seen = []
    forward = transformer.forward

    def spy(**kw):
        seen.append(kw)
        return forward(**kw)

    transformer.forward = spy
    try:
        S.generate_latents(transformer, cond, s, True, progress=False, control=c)
    finally:
        del transformer.forward
    noise = S.draw_noise(s.width, s.height, S.seeded_generator(7))
    from library.flux.math import pack_latents

    torch.testing.assert_close(seen[0]["img"], pack_latents(c + 0.5 * noise))
    assert seen[0].get("cond") is None and len(seen) == 3
    start, ref = S.start_and_reference(noise, c, Objective("flow_from_control", 0.0, True))
    assert torch.equal(start, c) and torch.equal(ref, c)
    start, ref = S.start_and_reference(noise, c, Objective())
    assert torch.equal(start, noise) and torch.equal(ref, c)


def run_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "flux_minimal_inference.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})


def test_cli_control_image_equals_diffusers(kontext, tiny_ckpts, control, reference, tmp_path) -> None:
    path = tmp_path / "control.png"
    control.save(path)
    c = CASE
    res = run_cli("--ckpt_path", kontext[0], "--clip_l", tiny_ckpts.clip_l, "--t5xxl", tiny_ckpts.t5xxl,
                  "--ae", tiny_ckpts.ae, "--prompt", c["prompt"], "--width", c["width"], "--height", c["height"],
                  "--steps", c["steps"], "--guidance", c["guidance"], "--seed", c["seed"], "--dtype", "float32",
                  "--device", "cpu", "--control_image_path", path, "--output_dir", tmp_path / "out",
                  "--output_name", "edit")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out" / "edit.png"
    assert psnr(Image.open(out).convert("RGB"), reference) >= BAR
    meta = S.read_png_settings(out)
    assert (meta["control_image"], meta["objective"], meta["reference_tokens"]) == ("control.png", "noise", True)
    assert "Control image: control.png" in Image.open(out).text["parameters"]


@pytest.mark.parametrize("case,expect", [
    ("missing", "no such file (given as --control_image)"),
    ("broken", "cannot read image"),
    ("flow_without_control", "give --control_image"),
])
def test_control_image_errors_name_the_file_or_flag(tiny_ckpts, tmp_path, case, expect) -> None:
    import flux_minimal_inference as fmi
    from library.errors import UserError

    args = ["--ckpt_path", tiny_ckpts.transformer, "--clip_l", tiny_ckpts.clip_l, "--t5xxl", tiny_ckpts.t5xxl,
            "--ae", tiny_ckpts.ae, "--width", 64, "--height", 64, "--steps", 1, "--device", "cpu",
            "--output_dir", tmp_path / "out"]
    if case == "missing":
        args += ["--control_image", tmp_path / "nope.png"]
    elif case == "broken":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        args += ["--control_image", tmp_path / "bad.png"]
    else:
        args += ["--objective", "flow_from_control"]
    with pytest.raises(UserError, match=re.escape(expect)) as err:
        fmi.main([str(a) for a in args])
    assert "\n" not in str(err.value) and (case == "flow_without_control" or str(tmp_path) in str(err.value))
    assert not (tmp_path / "out").exists()


def test_fp8_with_a_control_image(kontext, tiny_ckpts, control, tmp_path) -> None:
    """--fp8 (float8 block weights, bf16 compute) with --control_image runs and the reference reaches the
    fp8 model. (Not a parity test: float8 rounding of this sharpened tiny model alone costs ~20 dB.)"""
    import flux_minimal_inference as fmi

    path = tmp_path / "control.png"
    control.save(path)
    c = CASE
    args = ["--ckpt_path", str(kontext[0]), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl", str(tiny_ckpts.t5xxl),
            "--ae", str(tiny_ckpts.ae), "--prompt", c["prompt"], "--width", "64", "--height", "48", "--steps", "2",
            "--seed", str(c["seed"]), "--dtype", "bf16", "--fp8",
            "--ae_dtype", "fp32", "--device", "cpu", "--output_dir", str(tmp_path)]
    assert fmi.main(args + ["--control_image", str(path), "--output_name", "edit"]) == 0
    assert fmi.main(args + ["--output_name", "plain"]) == 0
    edit, plain = (Image.open(tmp_path / f"{n}.png").convert("RGB") for n in ("edit", "plain"))
    assert psnr(edit, plain) < BAR - 10, psnr(edit, plain)
    assert S.read_png_settings(tmp_path / "edit.png")["fp8"] is True


def test_fp8_kontext_edit_matches_bf16_on_the_same_rounded_weights(kontext, models, control) -> None:
    """fp8 parity with a control image (library.sampling.generate_image, CASE): the edit with the block Linear
    weights stored as float8 e4m3 (load_transformer(fp8=True), bf16 compute) equals, PSNR >= BAR (40 dB), the
    plain bf16 edit whose block Linear weights were rounded through e4m3 and back, i.e. the fp8 storage and its
    upcast change nothing else. (Against the float32 edit the rounding alone of this sharpened tiny model costs
    ~20 dB, about what dropping the reference costs too, so that comparison could not tell them apart.)
    Negative control: the fp8 model with the control image but its reference tokens dropped
    (Objective(reference_tokens=False)) falls below the bar."""
    _, ae, te = models
    fp8 = load_transformer(kontext[0], "cpu", torch.bfloat16, fp8=True)
    rounded = load_transformer(kontext[0], "cpu", torch.bfloat16)
    with torch.no_grad():
        for blocks in (rounded.double_blocks, rounded.single_blocks):
            for m in blocks.modules():
                if type(m) is torch.nn.Linear:
                    m.weight.copy_(to_fp8(m.weight).to(torch.bfloat16))
    want = S.generate_image(rounded, ae, te, **CASE, control=control, progress=False)
    edit = S.generate_image(fp8, ae, te, **CASE, control=control, progress=False)
    dropped = S.generate_image(fp8, ae, te, **CASE, control=control, objective=Objective("noise", 0.0, False),
                               progress=False)
    print("fp8 edit vs rounded bf16 edit", psnr(edit, want), "dropped", psnr(dropped, want))
    assert psnr(edit, want) >= BAR > psnr(dropped, want), (psnr(edit, want), psnr(dropped, want))
