"""Render prompts with our sampler (library/sampling.py), optionally with LoRAs applied on the fly.

Used by flux_enhance_iterate.py's built-in pair generation (a "before" image without and an "after" image
with the last differential LoRA, same prompt and seed) and by the colour-grade example's measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from library.flux.loading import load_autoencoder, load_transformer
from library.flux.text_encoders import FluxTextEncoders, load_clip_l, load_t5xxl
from library.sampling import encode_prompts, generate_latents, latents_to_pil, sample_settings
from networks.lora_flux import apply_lora_weights


@dataclass(frozen=True)
class RenderModels:
    transformer: Path
    ae: Path
    clip_l: Path
    t5xxl: Path


@dataclass(frozen=True)
class RenderSettings:
    width: int = 64
    height: int = 64
    steps: int = 8
    guidance: float = 3.5
    t5_max_length: int | None = None


@dataclass(frozen=True)
class Rendered:
    latents: torch.Tensor  # [16, h, w] the sampler's clean latents (AE-scaled)
    image: np.ndarray  # uint8 RGB [H, W, 3], the AE's decoding


@torch.no_grad()
def render(models: RenderModels, prompts: list[str], seeds: list[int], loras: list[tuple[Path, float]],
           settings: RenderSettings = RenderSettings()) -> list[Rendered]:
    """One rendering per (prompt, seed) pair, on the CPU in float32, with `loras` merged at their multipliers."""
    transformer = load_transformer(models.transformer, "cpu", torch.float32)
    text = FluxTextEncoders(load_clip_l(models.clip_l, "cpu", torch.float32), load_t5xxl(models.t5xxl, "cpu",
                                                                                          torch.float32))
    ae = load_autoencoder(models.ae, "cpu", torch.float32)
    if loras:
        apply_lora_weights(transformer, None, loras, merge=True)
    dev = bool(transformer.params.guidance_embed)
    out = []
    for prompt, seed in zip(prompts, seeds):
        s = sample_settings(dev, prompt, settings.width, settings.height, settings.steps, settings.guidance, seed,
                            t5_max_length=settings.t5_max_length)
        cond, _ = encode_prompts(text, s)
        z = generate_latents(transformer, cond, s, dev, progress=False)
        out.append(Rendered(z[0], np.asarray(latents_to_pil(ae, z)[0].convert("RGB"))))
    return out
