"""Flow-matching math for FLUX training: pure, typed functions, each formula exactly once.

Conventions (rectified flow, Liu et al. 2022 / Esser et al. 2024 "SD3"): σ ∈ (0, 1) is both the noise
level and the model's timestep input; the noisy latent is x_t = (1 − σ)·x0 + σ·n; the model predicts the
velocity v = n − x0. Latents are unpacked, [B, 16, h, w]. Every function that draws takes a
`torch.Generator`, so a run is reproducible from its seed and resumable from the generator's state.

Departure from kohya (its §12 defect #3): kohya compares the `sigma_scaled` x0 estimate and the `additive`
output with the velocity target. Here each prediction type maps prediction and target through the same
transform, so they are always compared in the same space.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"]
WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"]
PredictionType = Literal["raw", "additive", "sigma_scaled"]
LossType = Literal["l1", "l2", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]

NUM_TRAIN_TIMESTEPS = 1000  # the discrete grid of the `sigma` sampler (kohya's FlowMatchEulerDiscreteScheduler)


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift (Esser et al. 2024, eq. 23): σ = shift·s / (1 + (shift − 1)·s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def flux_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's μ: linear in the packed token count, 0.5 at 256 tokens and 1.15 at 4096 (BFL sampling.py)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


def time_shift(mu: float, s: torch.Tensor) -> torch.Tensor:
    """FLUX's exponential time shift with exponent 1: σ = e^μ / (e^μ + (1/s − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


def density_u(scheme: str, batch: int, generator: torch.Generator, *, logit_mean: float = 0.0,
              logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u ∈ [0, 1] drawn with the density of `--weighting_scheme` (SD3 §3.1): logit-normal, mode or uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    u = torch.rand(batch, generator=generator)
    if scheme == "mode":
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def discrete_sigmas(shift: float, n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The descending σ grid of a flow-match Euler scheduler with `n` steps: shift((n − i)/n), i = 0..n−1."""
    return shift_sigma(torch.arange(n, 0, -1, dtype=torch.float64).float() / n, shift)


def sample_sigmas(method: str, batch: int, generator: torch.Generator, *, latent_hw: tuple[int, int],
                  sigmoid_scale: float = 1.0, discrete_flow_shift: float = 3.0, weighting_scheme: str = "uniform",
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """σ per sample [B] for `--timestep_sampling` (kohya §5.1). `latent_hw` is the unpacked latent size."""
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    if method in ("sigmoid", "shift", "flux_shift"):
        s = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator))
        if method == "sigmoid":
            return s
        if method == "shift":
            return shift_sigma(s, discrete_flow_shift)
        h, w = latent_hw
        return time_shift(flux_mu((h // 2) * (w // 2)), s)
    if method == "sigma":
        u = density_u(weighting_scheme, batch, generator, logit_mean=logit_mean, logit_std=logit_std,
                      mode_scale=mode_scale)
        index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return discrete_sigmas(discrete_flow_shift)[index]
    raise ValueError(f"unknown timestep sampling {method!r}")


def perturb_noise(noise: torch.Tensor, gamma: float | None, random_strength: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, arXiv:2301.11706): n + γ·ξ, γ ~ U(0, γ) per sample if random."""
    if not gamma:
        return noise
    xi = torch.randn(noise.shape, generator=generator, dtype=noise.dtype)
    g = torch.full((noise.shape[0],), float(gamma))
    if random_strength:
        g = torch.rand(noise.shape[0], generator=generator) * gamma
    return noise + _per_sample(g, noise).to(noise.dtype) * xi


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`."""
    return x.view(-1, *([1] * (like.ndim - 1))).to(like.device)


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·n (rectified flow interpolation)."""
    s = _per_sample(sigmas, latents).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = dx_t/dσ = n − x0."""
    return noise - latents


def control_endpoint(control: torch.Tensor, noise: torch.Tensor, std: float) -> torch.Tensor:
    """The σ = 1 end of `--flow_from_control`: the control latent, optionally noised (PMRF, Ohayon et al.
    2024: start the flow from the degraded estimate plus Gaussian noise of std `--control_noise_std`).

    With this endpoint e in place of the noise n, `noisy_input` and `velocity_target` give
    x_σ = (1 − σ)·target + σ·e and v = e − target: FLUX's σ 1 → 0 sampler still runs in its pretrained
    direction, from the (noised) control at σ = 1 to the clean target at σ = 0.
    """
    if not std:
        return control
    return control + std * noise.to(control.dtype)


def x0_from_velocity(noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂₀ = x_σ − σ·v̂ (exact for x_σ = (1 − σ)·x0 + σ·e and v = e − x0, whatever the endpoint e)."""
    return noisy - _per_sample(sigmas, velocity).to(velocity.dtype) * velocity


def prediction_and_target(kind: str, pred: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor,
                          noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the model output and the velocity target through the same transform for `--model_prediction_type`.

    raw:          v̂            vs  v
    additive:     x_t + v̂      vs  x_t + v           (same minimiser as raw; kohya compares x_t + v̂ with v)
    sigma_scaled: x_t − σ·v̂   vs  x_t − σ·v = x0    (x0 space; kohya compares the x0 estimate with v)
    """
    target = velocity_target(latents, noise)
    if kind == "raw":
        return pred, target
    if kind == "additive":
        return noisy + pred, noisy + target
    if kind == "sigma_scaled":
        return x0_from_velocity(noisy, pred, sigmas), x0_from_velocity(noisy, target, sigmas)
    raise ValueError(f"unknown model prediction type {kind!r}")


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3 loss weights per sample [B]: sigma_sqrt → σ⁻², cosmap → 2/(π(1 − 2σ + 2σ²)), otherwise 1."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas.float() + 2.0 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def huber_c_for(schedule: str, huber_c: float, huber_scale: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber parameter [B] for `--huber_schedule`.

    constant:    c·scale
    exponential: exp(ln(c)·σ)·scale = c^σ·scale      (kohya's exp(−(−ln c/1000)·t) with t = 1000σ)
    snr:         ((1 − c)·(1 − σ)² + c)·scale        (kohya's (1 − c)/(1 + √(noise/signal))² + c with the
                                                        flow noise-to-signal ratio σ/(1 − σ); kohya raises here)
    """
    s = sigmas.float()
    if schedule == "constant":
        c = torch.full_like(s, huber_c)
    elif schedule == "exponential":
        c = torch.exp(math.log(huber_c) * s)
    elif schedule == "snr":
        c = (1.0 - huber_c) * (1.0 - s) ** 2 + huber_c
    else:
        raise ValueError(f"unknown huber schedule {schedule!r}")
    return c * huber_scale


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced loss: l2 (p−t)², l1 |p−t|, huber 2c(√((p−t)² + c²) − c),
    smooth_l1 2(√((p−t)² + c²) − c)."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if huber_c is None:
        raise ValueError(f"{loss_type} needs huber_c")
    c = _per_sample(huber_c.float(), diff)
    root = torch.sqrt(diff**2 + c**2) - c
    if loss_type == "huber":
        return 2.0 * c * root
    if loss_type == "smooth_l1":
        return 2.0 * root
    raise ValueError(f"unknown loss type {loss_type!r}")


def resize_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask [B, H, W] or [B, 1, H, W] in [0, 1] -> [B, 1, h, w] by area averaging (kohya's resize)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    return F.interpolate(mask.float(), size=latent_hw, mode="area")


def reduce_loss(loss: torch.Tensor, weighting: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """kohya §5.3: × weighting [B] × mask [B,1,h,w], mean per sample, × sample weights [B] (prior), mean."""
    if weighting is not None:
        loss = loss * _per_sample(weighting.float(), loss)
    if mask is not None:
        loss = loss * mask.to(loss.device, loss.dtype)
    per_sample = loss.mean(dim=tuple(range(1, loss.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
