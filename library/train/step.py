"""One training step: batch -> (noise, σ) -> noisy latents -> FLUX -> loss -> backward -> clip -> update.

The trainer (library/train/trainer.py) and the step benchmark (tools/bench_train_step.py) both run
`forward_backward` and `apply_update`, so a benchmark figure is the trainer's own step, not a copy of it.

Noise and σ are drawn per sample from a generator seeded by (seed, step, image, occurrence), so they do
not depend on how samples are split into batches or across processes: a resumed run draws the same noise
as the uninterrupted one, and two processes at batch B draw what one process at batch 2B draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from library import flow
from library.errors import UserError
from library.flux.math import make_img_ids, make_txt_ids, pack_latents, unpack_latents
from library.train.config import ObjectiveConfig


@dataclass(frozen=True)
class StepInputs:
    latents: torch.Tensor  # [B, 16, h, w] float32
    t5_out: torch.Tensor  # [B, S, 4096]
    clip_pooled: torch.Tensor  # [B, 768]
    t5_attn_mask: torch.Tensor  # [B, S]
    sample_weights: torch.Tensor  # [B] prior_loss_weight for regularization images, else 1
    loss_mask: torch.Tensor | None  # [B, 1, h, w]
    keys: tuple[str, ...]  # one per sample: what seeds its noise
    cond_latents: torch.Tensor | None = None  # [B, 16, h', w'] FLUX.1 Kontext reference image (control subsets)


def sample_generator(seed: int, step: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sample_keys(paths: list[str]) -> tuple[str, ...]:
    """The image path plus its occurrence in the batch (repeats of one image get different noise)."""
    seen: dict[str, int] = {}
    keys = []
    for p in paths:
        seen[p] = seen.get(p, -1) + 1
        keys.append(f"{p}#{seen[p]}")
    return tuple(keys)


def draw_noise_and_sigmas(obj: ObjectiveConfig, latents: torch.Tensor, keys: tuple[str, ...], seed: int,
                          step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise for the target, noise in the input (perturbed), σ), each per sample from its own generator."""
    noise, noise_in, sigmas = [], [], []
    for i, key in enumerate(keys):
        g = sample_generator(seed, step, key)
        n = torch.randn(latents[i].shape, generator=g, dtype=torch.float32)
        s = flow.sample_sigmas(obj.timestep_sampling, 1, g, latent_hw=tuple(latents.shape[-2:]),
                               sigmoid_scale=obj.sigmoid_scale, discrete_flow_shift=obj.discrete_flow_shift,
                               weighting_scheme=obj.weighting_scheme, logit_mean=obj.logit_mean,
                               logit_std=obj.logit_std, mode_scale=obj.mode_scale)
        n_in = flow.perturb_noise(n[None], obj.ip_noise_gamma, obj.ip_noise_gamma_random_strength, g)[0]
        noise.append(n)
        noise_in.append(n_in)
        sigmas.append(s)
    dev = latents.device
    return torch.stack(noise).to(dev), torch.stack(noise_in).to(dev), torch.cat(sigmas).to(dev)


def endpoints(x: StepInputs, obj: ObjectiveConfig, noise: torch.Tensor, noise_in: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ = 1 endpoint of the target velocity, the one in the model input): the noise for the Kontext
    objective; the (noised) control latent for --flow_from_control, with the input perturbation on top."""
    if not obj.flow_from_control:
        return noise, noise_in
    if x.cond_latents is None:
        raise UserError(f"{x.keys[0].rsplit('#', 1)[0]}: --flow_from_control needs a control image for every "
                        "training image (a subset with conditioning_data_dir or a degradation table)")
    control = x.cond_latents.float()
    if control.shape != x.latents.shape:
        raise UserError(f"{x.keys[0].rsplit('#', 1)[0]}: --flow_from_control needs the control image at the "
                        f"target's size (latents {tuple(control.shape[-2:])} vs {tuple(x.latents.shape[-2:])})")
    end = flow.control_endpoint(control, noise, obj.control_noise_std)
    return end, end + (noise_in - noise)


def flow_matching_loss(transformer: torch.nn.Module, x: StepInputs, obj: ObjectiveConfig, seed: int, step: int,
                       guidance_embed: bool, apply_t5_attn_mask: bool, autocast: Any,
                       perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """The step's loss. `perceptual(x̂0, target latents)` (library/train/perceptual.py), when given, is added
    with --perceptual_loss_weight on every --perceptual_every_n_steps-th step."""
    latents = x.latents.float()
    noise, noise_in, sigmas = draw_noise_and_sigmas(obj, latents, x.keys, seed, step)
    end, end_in = endpoints(x, obj, noise, noise_in)
    noisy = flow.noisy_input(latents, end_in, sigmas)
    b, _, h, w = latents.shape
    dev = latents.device
    dtype = x.t5_out.dtype
    guidance = torch.full((b,), obj.guidance_scale, device=dev) if guidance_embed else None
    cond = cond_ids = None
    if x.cond_latents is not None and obj.uses_reference_tokens:  # Kontext: clean reference tokens, id axis 1
        hc, wc = x.cond_latents.shape[-2:]
        cond = pack_latents(x.cond_latents.float())
        cond_ids = make_img_ids(b, hc // 2, wc // 2, index=1).to(dev)
    with autocast():
        packed = transformer(img=pack_latents(noisy), img_ids=make_img_ids(b, h // 2, w // 2).to(dev),
                             txt=x.t5_out, txt_ids=make_txt_ids(b, x.t5_out.shape[1]).to(dev, dtype),
                             timesteps=sigmas, y=x.clip_pooled, guidance=guidance,
                             txt_mask=x.t5_attn_mask.bool() if apply_t5_attn_mask else None,
                             cond=cond, cond_ids=cond_ids)
    pred = unpack_latents(packed.float(), h, w)
    p, t = flow.prediction_and_target(obj.model_prediction_type, pred, noisy, latents, end, sigmas)
    huber_c = None
    if obj.loss_type in ("huber", "smooth_l1"):
        huber_c = flow.huber_c_for(obj.huber_schedule, obj.huber_c, obj.huber_scale, sigmas)
    loss = flow.elementwise_loss(p, t, obj.loss_type, huber_c)
    weighting = flow.loss_weighting(obj.weighting_scheme, sigmas) if obj.model_prediction_type == "sigma_scaled" \
        else None
    total = flow.reduce_loss(loss, weighting, x.loss_mask, x.sample_weights)
    if perceptual is not None and obj.perceptual_loss_weight > 0 and step % obj.perceptual_every_n_steps == 0:
        total = total + obj.perceptual_loss_weight * perceptual(flow.x0_from_velocity(noisy, pred, sigmas), latents)
    return total



def forward_backward(transformer: torch.nn.Module, x: StepInputs, obj: ObjectiveConfig, seed: int, step: int,
                     guidance_embed: bool, apply_t5_attn_mask: bool, autocast: Any,
                     backward: Callable[[torch.Tensor], None], accumulation: int = 1,
                     check: Callable[[float], None] | None = None,
                     perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """The loss of one micro-batch, then its backward (scaled by 1/accumulation); returns the loss value.

    The value is read once, before backward is queued, so the host does not wait for the backward pass;
    `check(value)` runs before backward (the trainer stops there on a non-finite loss)."""
    loss = flow_matching_loss(transformer, x, obj, seed, step, guidance_embed, apply_t5_attn_mask, autocast,
                              perceptual)
    value = float(loss.item())
    if check is not None:
        check(value)
    backward(loss / accumulation)
    return value


def apply_update(params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 clip_grad_norm: Callable[..., Any] = torch.nn.utils.clip_grad_norm_) -> None:
    """Clip the gradients of `params` to `max_grad_norm` (0: no clipping), step, and drop the gradients."""
    params = list(params)
    if max_grad_norm and params:
        clip_grad_norm(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
