"""Shared helpers of the LoRA tests: tiny models, inputs, "trained" (non-zero) networks."""

from __future__ import annotations

import torch

from library.flux.math import make_img_ids, make_txt_ids
from library.flux.model import Flux, FluxParams


def tiny_params(hidden: int = 256, depth: int = 2, single: int = 2, guidance: bool = True) -> FluxParams:
    from library.flux.tiny import tiny_flux_params

    p = tiny_flux_params(guidance)
    return FluxParams(**{**p.__dict__, "hidden_size": hidden, "depth": depth, "depth_single_blocks": single})


def tiny_flux(seed: int = 0, **kw) -> Flux:
    """A tiny FLUX with random non-zero weights (biases too), float32."""
    torch.manual_seed(seed)
    model = Flux(tiny_params(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (fan ** -0.5 if p.ndim >= 2 else 0.1)
                    + (1.0 if name.endswith("scale") else 0.0))
    return model.eval().requires_grad_(False)


def tiny_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def flux_inputs(p: FluxParams, batch: int = 2, h: int = 2, w: int = 3, s: int = 5, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, h * w, p.in_channels, generator=gen), img_ids=make_img_ids(batch, h, w),
                txt=torch.randn(batch, s, p.context_in_dim, generator=gen), txt_ids=make_txt_ids(batch, s),
                timesteps=torch.tensor([0.3, 0.8][:batch]), y=torch.randn(batch, p.vec_in_dim, generator=gen),
                guidance=torch.tensor([3.5, 5.0][:batch]) if p.guidance_embed else None)


@torch.no_grad()
def randomize_network(network, seed: int = 1, std: float = 0.05) -> None:
    """Give every LoRA up matrix random values (a fresh one is zero and would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for a in network.adapters():
        ups = a.lora_up if a.split_dims else [a.lora_up]
        for u in ups:
            u.weight.copy_(torch.randn(u.weight.shape, generator=gen) * std)


def random_lora(shapes: dict[str, tuple[int, int]], rank: int = 4, alpha: float | None = 2.0, seed: int = 0):
    """{kohya name: LoRAWeight} with random down/up for module shapes {name: (out, in)}."""
    from networks.lora_formats import LoRAWeight

    gen = torch.Generator().manual_seed(seed)
    return {n: LoRAWeight(torch.randn(rank, i, generator=gen) * 0.1, torch.randn(o, rank, generator=gen) * 0.1,
                          alpha) for n, (o, i) in shapes.items()}
