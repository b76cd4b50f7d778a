"""End-to-end: our sampler / flux_minimal_inference.py against diffusers' FluxPipeline on the same tiny weights.

The parity bar is PSNR >= 40 dB on the 8-bit images; the tests also show that the bar is discriminating:
changing the prompt, the guidance, the step count or the shift each drop the PSNR far below it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_minimal_inference
from cli_helpers import run_in_process
from library.errors import UserError
from library.flux.loading import load_autoencoder, load_transformer
from library.flux.text_encoders import FluxTextEncoders
from library.sampling import generate_image, read_png_settings

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
BAR = 40.0  # dB
# Non-square on purpose (the latent grid is 5 x 8 tokens): a width/height swap anywhere would show.
CASE = dict(prompt="a photo of sks dog on the beach", width=128, height=80, steps=4, guidance=3.5, seed=7)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def diffusers_image(folder: Path, prompt: str, width: int, height: int, steps: int, guidance: float,
                    seed: int, **kw) -> Image.Image:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]


class Ours:
    def __init__(self, ck) -> None:
        self.transformer = load_transformer(ck.transformer, "cpu", torch.float32)
        self.ae = load_autoencoder(ck.ae, "cpu", torch.float32)
        self.te = FluxTextEncoders.load(ck.clip_l, ck.t5xxl, "cpu", torch.float32)

    def image(self, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int,
              shift: bool | None = None) -> Image.Image:
        return generate_image(self.transformer, self.ae, self.te, prompt, width, height, steps, guidance, seed,
                              shift=shift, progress=False)


@pytest.fixture(scope="module")
def dev(tiny_ckpts):
    return Ours(tiny_ckpts), diffusers_image(tiny_ckpts.diffusers, **CASE)


def test_image_equals_diffusers_flux_pipeline(dev) -> None:
    ours, ref = dev
    image = ours.image(**CASE)
    assert image.size == (CASE["width"], CASE["height"])
    assert psnr(image, ref) >= BAR
    assert np.asarray(ref).std() > 20  # the reference is a real, high-contrast image, not a flat one


def test_latents_equal_diffusers_before_the_8_bit_image(dev, tiny_ckpts) -> None:
    """The 40 dB bar on 8-bit images lets a 2 % error in every Euler step through (48 dB): compare the
    latents themselves too, where the two samplers agree to float32 rounding."""
    from diffusers import FluxPipeline

    from library.flux.math import pack_latents
    from library.sampling import generate_latents, sample_settings

    ours, _ = dev
    pipe = FluxPipeline.from_pretrained(str(tiny_ckpts.diffusers), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    c = CASE
    ref = pipe(c["prompt"], width=c["width"], height=c["height"], num_inference_steps=c["steps"],
               guidance_scale=c["guidance"], generator=torch.Generator("cpu").manual_seed(c["seed"]),
               output_type="latent").images  # packed [1, L, 64], before the AE's scale/shift
    s = sample_settings(True, **c)
    got = pack_latents(generate_latents(ours.transformer, ours.te.encode([s.prompt], s.t5_max_length), s, True,
                                        progress=False))
    assert got.shape == ref.shape and ref.std() > 0.1
    err = ((got - ref).norm() / ref.norm()).item()
    assert err <= 1e-4


@pytest.mark.parametrize("change", [
    dict(prompt="a watercolor of a red fox in snow"),  # other tokens for CLIP and T5
    dict(guidance=1.5),
    dict(steps=5),
    dict(shift=False),  # FLUX.1-dev sampled without its resolution-dependent shift
    dict(seed=8),
])
def test_a_wrong_input_breaks_the_bar(dev, change: dict) -> None:
    ours, ref = dev
    args = {**CASE, **change}
    value = psnr(ours.image(**args), ref)
    assert value < BAR - 10, f"{change}: PSNR {value:.1f} dB, the image does not depend on it"


def test_each_encoder_reaches_the_image(dev) -> None:
    """A prompt change seen by only CLIP (pooled vector) or only T5 (token states) still breaks the bar."""
    from library.sampling import generate_latents, latents_to_pil, sample_settings

    ours, ref = dev
    s = sample_settings(True, **CASE)
    base = ours.te.encode([s.prompt], s.t5_max_length)
    other = ours.te.encode(["a watercolor of a red fox in snow"], s.t5_max_length)
    for name, cond in [("clip", type(base)(base.t5_out, other.clip_pooled, base.t5_attn_mask)),
                       ("t5", type(base)(other.t5_out, base.clip_pooled, base.t5_attn_mask))]:
        image = latents_to_pil(ours.ae, generate_latents(ours.transformer, cond, s, True, progress=False))[0]
        assert psnr(image, ref) < BAR - 10, name


def test_schnell_equals_diffusers(tiny_ckpts_schnell) -> None:
    case = dict(CASE, steps=3, width=96, height=64)  # schnell: no guidance embedding, 256 T5 tokens, no shift
    ref = diffusers_image(tiny_ckpts_schnell.diffusers, **case, max_sequence_length=256)
    ours = Ours(tiny_ckpts_schnell)
    assert psnr(ours.image(**case), ref) >= BAR
    assert psnr(ours.image(**case, shift=True), ref) < BAR - 10


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "flux_minimal_inference.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})


def test_cli_on_diffusers_folder_writes_the_same_png_with_metadata(dev, tiny_ckpts, tmp_path) -> None:
    _, ref = dev
    c = CASE
    res = run_cli("--ckpt_path", tiny_ckpts.diffusers, "--prompt", c["prompt"], "--width", c["width"],
                  "--height", c["height"], "--steps", c["steps"], "--guidance", c["guidance"], "--seed", c["seed"],
                  "--dtype", "float32", "--device", "cpu", "--output_dir", tmp_path / "out", "--output_name", "img")
    assert res.returncode == 0, res.stderr
    path = tmp_path / "out" / "img.png"
    assert psnr(Image.open(path).convert("RGB"), ref) >= BAR
    meta = read_png_settings(path)
    assert {k: meta[k] for k in c} == c and meta["shift"] is True and meta["t5_max_length"] == 512
    assert Image.open(path).text["parameters"].startswith(c["prompt"] + "\n")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img.png"]  # nothing left behind


@pytest.mark.parametrize("case,expect", [
    ("t5_as_clip", "looks like a T5 file passed as --clip_l"),
    ("truncated_t5", "truncated"),
])
def test_cli_wrong_text_encoder_file_exits_2_without_traceback(tiny_ckpts, tmp_path, case, expect) -> None:
    """In this process (tests/cli_helpers.py); the CLI runs as a real process in the test above."""
    clip_l, t5xxl = tiny_ckpts.clip_l, tiny_ckpts.t5xxl
    if case == "t5_as_clip":
        clip_l = tiny_ckpts.t5xxl
    else:  # a download cut short
        t5xxl = tmp_path / "t5xxl_fp16.safetensors"
        data = tiny_ckpts.t5xxl.read_bytes()
        t5xxl.write_bytes(data[: len(data) // 2])
    res = run_in_process(flux_minimal_inference.main, [
        "--ckpt_path", tiny_ckpts.transformer, "--clip_l", clip_l, "--t5xxl", t5xxl, "--ae", tiny_ckpts.ae,
        "--width", 64, "--height", 64, "--steps", 1, "--dtype", "float32", "--output_dir", tmp_path])
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and expect in res.stderr and "Traceback" not in res.stderr
    assert str(clip_l if case == "t5_as_clip" else t5xxl) in res.stderr
    assert not list(tmp_path.glob("*.png"))


def test_cli_single_file_needs_the_text_encoders(tiny_ckpts, tmp_path) -> None:
    res = run_cli("--ckpt_path", tiny_ckpts.transformer, "--output_dir", tmp_path)
    assert res.returncode == 2 and "--clip_l is required" in res.stderr and "Traceback" not in res.stderr


def test_true_cfg_with_negative_prompt_equals_diffusers(dev, tiny_ckpts) -> None:
    """kohya's --negative_prompt/--cfg_scale = diffusers' negative_prompt/true_cfg_scale (v_neg + s (v - v_neg))."""
    ours, plain = dev
    neg = "blurry, low quality"
    ref = diffusers_image(tiny_ckpts.diffusers, **CASE, negative_prompt=neg, true_cfg_scale=2.0)
    image = generate_image(ours.transformer, ours.ae, ours.te, **CASE, negative_prompt=neg, cfg_scale=2.0,
                           progress=False)
    assert psnr(image, ref) >= BAR
    assert psnr(plain, ref) < BAR - 10  # CFG really changed the image


def test_kohya_dtype_flags_and_interactive_syntax(tiny_ckpts) -> None:
    import flux_minimal_inference as fmi

    base = ["--ckpt_path", str(tiny_ckpts.diffusers)]
    a = fmi.parse_args(base + ["--dtype", "bf16", "--flux_dtype", "fp8", "--t5xxl_dtype", "fp16"])
    assert (a.flux_dtype, a.flux_fp8, a.t5xxl_dtype, a.clip_l_dtype, a.ae_dtype) == \
        ("bfloat16", True, "float16", "bfloat16", "bfloat16")
    a = fmi.parse_args(base + ["--width", "1000", "--height", "700"])
    assert (a.width, a.height, a.clip_l, a.ae) == (992, 688, tiny_ckpts.diffusers, tiny_ckpts.diffusers)
    first = fmi.Request("a cat", "", 1360, 768, None, 3.5, 1.0, 1)
    req = fmi.parse_interactive_line("a dog --w 512 --h 300 --s 8 --d 5 --g 2.5 --n ugly --c 3", first)
    assert req == fmi.Request("a dog", "ugly", 512, 288, 8, 2.5, 3.0, 5)
    assert fmi.parse_interactive_line("a fox", req).seed is None  # a new random seed unless given
    with pytest.raises(UserError, match="--x"):
        fmi.parse_interactive_line("a fox --x 1", req)
    with pytest.raises(SystemExit):
        fmi.parse_args(base + ["--dtype", "int8"])
    assert fmi.parse_lora_arg(f"{tiny_ckpts.ae};-0.5") == (tiny_ckpts.ae, -0.5)
    assert fmi.parse_lora_arg(str(tiny_ckpts.ae)) == (tiny_ckpts.ae, 1.0)
    with pytest.raises(UserError, match="not a number"):
        fmi.parse_lora_arg(f"{tiny_ckpts.ae};strong")
    with pytest.raises(UserError, match="no such LoRA file"):
        fmi.parse_lora_arg("missing.safetensors;0.5")


def test_apply_t5_attn_mask_reaches_t5_and_the_transformer(dev) -> None:
    """kohya's --apply_t5_attn_mask hides T5 padding inside T5 and from the transformer's attention."""
    from library.sampling import denoise, draw_noise, get_schedule, image_seq_len, seeded_generator

    ours, ref = dev
    masked = generate_image(ours.transformer, ours.ae, ours.te, **CASE, apply_t5_attn_mask=True, progress=False)
    assert psnr(masked, ref) < BAR - 10
    # the transformer part alone: same (unmasked-T5) conditioning, mask given or not
    cond = ours.te.encode([CASE["prompt"]], 512)
    noise = draw_noise(CASE["width"], CASE["height"], seeded_generator(CASE["seed"]))
    schedule = get_schedule(2, image_seq_len(CASE["width"], CASE["height"]))
    a = denoise(ours.transformer, noise, cond, schedule, 3.5, apply_t5_attn_mask=False, progress=False)
    b = denoise(ours.transformer, noise, cond, schedule, 3.5, apply_t5_attn_mask=True, progress=False)
    assert (a - b).abs().max() > 1e-2


def test_cli_schnell_defaults(tiny_ckpts_schnell, tmp_path) -> None:
    """schnell (no guidance embedding in the file): 4 steps, 256 T5 tokens, no shift, unless told otherwise."""
    import flux_minimal_inference as fmi

    ck = tiny_ckpts_schnell
    assert fmi.main(["--ckpt_path", str(ck.transformer), "--clip_l", str(ck.clip_l), "--t5xxl", str(ck.t5xxl),
                     "--ae", str(ck.ae), "--width", "64", "--height", "48", "--seed", "1", "--dtype", "fp32",
                     "--device", "cpu", "--output_dir", str(tmp_path), "--output_name", "s"]) == 0
    meta = read_png_settings(tmp_path / "s.png")
    assert (meta["steps"], meta["t5_max_length"], meta["shift"], meta["model_type"]) == (4, 256, False, "schnell")
