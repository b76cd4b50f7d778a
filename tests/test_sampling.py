"""library/sampling.py against diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler (the reference)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from library.flux.math import make_img_ids, pack_latents
from library.flux.text_encoders import TextEncoding
from library.sampling import (
    SampleSettings,
    denoise,
    draw_noise,
    get_schedule,
    image_seq_len,
    latent_size,
    parameters_text,
    read_png_settings,
    save_png,
    seeded_generator,
)
from library.flow import flux_mu, time_shift

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402

# FLUX.1-dev's and FLUX.1-schnell's scheduler_config.json
DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SCHNELL_SCHEDULER = dict(DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
SIZES = [(1024, 1024), (768, 1360), (96, 64), (128, 80), (512, 512), (2048, 1024)]


def diffusers_sigmas(config: dict, width: int, height: int, steps: int) -> torch.Tensor:
    """What FluxPipeline.__call__ hands its scheduler (sigmas, with the terminal 0 appended)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    seq_len = (2 * (height // 16) // 2) * (2 * (width // 16) // 2)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_dev_schedule_equals_diffusers(width: int, height: int, steps: int) -> None:
    ours = get_schedule(steps, image_seq_len(width, height), shift=True)
    ref = diffusers_sigmas(DEV_SCHEDULER, width, height, steps)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize("width,height", SIZES[:3])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_schedule_equals_diffusers(width: int, height: int, steps: int) -> None:
    ours = get_schedule(steps, image_seq_len(width, height), shift=False)
    torch.testing.assert_close(ours, diffusers_sigmas(SCHNELL_SCHEDULER, width, height, steps), rtol=0, atol=2e-7)


def test_schedule_equals_bfl_reference_formula() -> None:
    # BFL flux/sampling.py get_schedule: float32 linspace, then exp(mu) / (exp(mu) + (1/t - 1)).
    steps, seq = 28, image_seq_len(1024, 768)
    mu = (1.15 - 0.5) / (4096 - 256) * seq + (0.5 - (1.15 - 0.5) / (4096 - 256) * 256)
    t = torch.linspace(1, 0, steps + 1)
    bfl = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    torch.testing.assert_close(get_schedule(steps, seq), bfl, rtol=0, atol=1e-6)


def test_shift_endpoints_and_direction() -> None:
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    t = torch.tensor([1e-9, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    shifted = time_shift(1.0, t)
    assert shifted[-1] == 1.0 and shifted[0] < 1e-8
    assert bool((shifted[1:-1] > t[1:-1]).all())  # a positive shift spends more steps at high noise
    big, small = get_schedule(10, 4096), get_schedule(10, 256)
    assert bool((big[1:-1] > small[1:-1]).all())  # larger images are shifted more


@pytest.mark.parametrize("width,height", [(128, 80), (96, 64), (1024, 768), (100, 70)])
def test_noise_and_ids_equal_diffusers_prepare_latents(width: int, height: int) -> None:
    fake = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxPipeline._pack_latents,
                           _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)
    ref, ref_ids = FluxPipeline.prepare_latents(fake, 1, 16, height, width, torch.float32, "cpu",
                                                torch.Generator().manual_seed(1234))
    noise = draw_noise(width, height, seeded_generator(1234))
    h, w = latent_size(width, height)
    assert noise.shape == (1, 16, h, w) and noise.dtype == torch.float32
    assert torch.equal(pack_latents(noise), ref)
    assert torch.equal(make_img_ids(1, h // 2, w // 2)[0], ref_ids)
    assert not torch.equal(draw_noise(width, height, seeded_generator(1235)), noise)


class _ToyVelocity(torch.nn.Module):
    """A deterministic stand-in for the transformer: v = a * x + b(t) + c * pooled, depends on every input."""

    params = SimpleNamespace(guidance_embed=True)

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_mask=None):
        return self.a * img + timesteps[:, None, None] ** 2 + 0.1 * guidance[:, None, None] + y.mean() \
            + 0.01 * txt.mean() + 0.001 * img_ids[..., 1:2]


def test_euler_loop_equals_diffusers_scheduler_steps() -> None:
    model = _ToyVelocity()
    cond = TextEncoding(t5_out=torch.randn(1, 8, 4), clip_pooled=torch.randn(1, 4), t5_attn_mask=torch.ones(1, 8))
    width, height, steps = 96, 64, 6
    noise = draw_noise(width, height, seeded_generator(3))
    schedule = get_schedule(steps, image_seq_len(width, height))
    ours = denoise(model, noise, cond, schedule, guidance=2.5, progress=False)

    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                       mu=calculate_shift(image_seq_len(width, height)))
    h, w = latent_size(width, height)
    x, ids = pack_latents(noise), make_img_ids(1, h // 2, w // 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(x, ids, cond.t5_out, None, (t / 1000).expand(1), cond.clip_pooled, torch.tensor([2.5]))
            x = scheduler.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(pack_latents(ours), x, rtol=1e-5, atol=1e-5)
    # the loop must actually depend on the step count and guidance
    assert not torch.allclose(denoise(model, noise, cond, get_schedule(5, 24), 2.5, progress=False), ours)
    assert not torch.allclose(denoise(model, noise, cond, schedule, 1.0, progress=False), ours)


def test_png_metadata_round_trip(tmp_path) -> None:
    settings = SampleSettings(prompt="a photo of sks dog, 'quoted', ünïcode", width=128, height=80, steps=4,
                              guidance=3.5, seed=42, shift=True, t5_max_length=512)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 128, 3), dtype=np.uint8))
    path = save_png(image, tmp_path / "sub" / "x.png", settings, {"model": "flux1-dev.safetensors"})
    assert path.exists() and not list(path.parent.glob(".*tmp*"))
    back = read_png_settings(path)
    assert back["prompt"] == settings.prompt and back["seed"] == 42 and back["width"] == 128
    assert back["guidance"] == 3.5 and back["model"] == "flux1-dev.safetensors"
    with Image.open(path) as im:
        assert im.text["parameters"] == parameters_text(settings, "flux1-dev.safetensors")
        assert im.text["parameters"].splitlines()[0] == settings.prompt
        assert "Steps: 4" in im.text["parameters"] and "Seed: 42" in im.text["parameters"]
        assert np.array_equal(np.asarray(im), np.asarray(image))


def test_true_cfg_combines_the_two_velocities() -> None:
    model = _ToyVelocity()
    pos = TextEncoding(t5_out=torch.randn(1, 8, 4), clip_pooled=torch.randn(1, 4), t5_attn_mask=torch.ones(1, 8))
    neg = TextEncoding(t5_out=torch.randn(1, 8, 4), clip_pooled=torch.randn(1, 4), t5_attn_mask=torch.ones(1, 8))
    noise = draw_noise(64, 32, seeded_generator(0))
    schedule = get_schedule(3, image_seq_len(64, 32))
    out = denoise(model, noise, pos, schedule, 2.0, neg_cond=neg, cfg_scale=3.0, progress=False)
    x, ids = pack_latents(noise), make_img_ids(1, 2, 4)  # 64x32 image: 4x8 latents, 2x4 tokens
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            g, tv = torch.tensor([2.0]), t.reshape(1)
            v_pos = model(x, ids, pos.t5_out, None, tv, pos.clip_pooled, g)
            v_neg = model(x, ids, neg.t5_out, None, tv, neg.clip_pooled, g)
            x = x + (t_next - t) * (v_neg + 3.0 * (v_pos - v_neg))
    torch.testing.assert_close(pack_latents(out), x)
    plain = denoise(model, noise, pos, schedule, 2.0, progress=False)
    torch.testing.assert_close(denoise(model, noise, pos, schedule, 2.0, neg_cond=neg, cfg_scale=1.0,
                                       progress=False), plain)
    assert not torch.allclose(out, plain)
