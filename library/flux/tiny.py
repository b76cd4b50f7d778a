"""Tiny, seeded, random FLUX checkpoints in every real layout: the tests' and the demo's weights.

Design note: the transformer keeps FLUX's real head dim (128), RoPE axes and key layout (hidden 256 =
2 heads, 2 double + 2 single blocks, 64 input channels) and the AE its real structure (4 levels, 32-group
GroupNorm, 16 latent channels), so every code path of the full model runs. Weights are drawn at unit gain
(linear/conv std 1/sqrt(fan_in), norm scales 1 ± 0.1, biases std 0.1) instead of the real models' small
init: activations stay O(1) and the output depends clearly on every input (image, timestep, text, pooled
vector, guidance), so parity tests against diffusers can fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.flux.autoencoder import SCALE, SHIFT, AutoEncoder, AutoEncoderParams
from library.flux.convert import ae_bfl_to_diffusers, transformer_bfl_to_diffusers
from library.flux.model import Flux, FluxParams
from library.flux.safetensors_io import save_file_atomic
from library.flux.tiny_text import (tiny_text_dims, write_json, write_tiny_text_encoders,
                                    write_tiny_text_encoders_diffusers)

TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
TRANSFORMER_DTYPE = torch.bfloat16  # as flux1-dev.safetensors ships
AE_DTYPE = torch.float32  # as ae.safetensors ships
DIFFUSERS_VERSION = "0.42.1"


@dataclass(frozen=True)
class TinyCheckpoints:
    transformer: Path  # BFL single file
    ae: Path  # BFL ae.safetensors
    clip_l: Path  # ComfyUI clip_l.safetensors
    t5xxl: Path  # ComfyUI t5xxl_fp16.safetensors
    diffusers: Path  # a complete FluxPipeline folder
    guidance_embed: bool


def tiny_flux_params(guidance_embed: bool = True) -> FluxParams:
    vec_in_dim, context_in_dim = tiny_text_dims()
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=vec_in_dim, context_in_dim=context_in_dim,
                      hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                      qkv_bias=True, guidance_embed=guidance_embed)


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Unit-gain random values for every parameter of `module` (see the design note), as a state dict."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        if p.ndim >= 2:  # Linear / Conv weight: std 1/sqrt(fan_in)
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=gen) * fan_in ** -0.5
        elif name.endswith((".scale", "norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight")):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            t = 0.1 * torch.randn(p.shape, generator=gen)
        out[name] = t
    return out


def tiny_transformer_state_dict(seed: int = 0, guidance_embed: bool = True) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = Flux(tiny_flux_params(guidance_embed))
    return {k: v.to(TRANSFORMER_DTYPE) for k, v in _randomize(model, seed).items()}


def tiny_ae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = AutoEncoder(TINY_AE)
    return {k: v.to(AE_DTYPE) for k, v in _randomize(model, seed + 100).items()}


def transformer_config(p: FluxParams) -> dict:
    """diffusers FluxTransformer2DModel config.json for `p`."""
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "attention_head_dim": p.hidden_size // p.num_heads, "axes_dims_rope": list(p.axes_dim),
            "guidance_embeds": p.guidance_embed, "in_channels": p.in_channels, "joint_attention_dim":
            p.context_in_dim, "num_attention_heads": p.num_heads, "num_layers": p.depth,
            "num_single_layers": p.depth_single_blocks, "out_channels": None, "patch_size": 1,
            "pooled_projection_dim": p.vec_in_dim}


def vae_config(p: AutoEncoderParams) -> dict:
    """diffusers AutoencoderKL config.json for `p` (FLUX: no quant convs, scale/shift factors)."""
    n = len(p.ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": [p.ch * m for m in p.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * n,
            "force_upcast": True, "in_channels": p.in_channels, "latent_channels": p.z_channels,
            "latents_mean": None, "latents_std": None, "layers_per_block": p.num_res_blocks,
            "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": p.out_ch,
            "sample_size": 1024, "scaling_factor": SCALE, "shift_factor": SHIFT,
            "up_block_types": ["UpDecoderBlock2D"] * n, "use_post_quant_conv": False, "use_quant_conv": False}


def scheduler_config(guidance_embed: bool) -> dict:
    """FlowMatchEulerDiscreteScheduler config of FLUX.1-dev (resolution-dependent shift) or schnell."""
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
           "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
           "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
    if not guidance_embed:  # schnell: fixed schedule, no shift
        cfg.update(shift=1.0, use_dynamic_shifting=False)
    return cfg


MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _write_sharded(sd: dict[str, torch.Tensor], folder: Path, basename: str, n_shards: int = 2) -> None:
    """diffusers-style shards `basename-0000i-of-0000n.safetensors` plus `basename.safetensors.index.json`."""
    names = sorted(sd)
    per = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        file = f"{basename}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = names[i * per:(i + 1) * per]
        save_file_atomic({k: sd[k] for k in shard}, folder / file)
        weight_map.update({k: file for k in shard})
        total += sum(sd[k].numel() * sd[k].element_size() for k in shard)
    write_json(folder / f"{basename}.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tiny_checkpoints(out_dir: str | Path, seed: int = 0, guidance_embed: bool = True) -> TinyCheckpoints:
    """Write the tiny transformer, AE, CLIP-L and T5 as single files and as a diffusers FluxPipeline folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variant = "dev" if guidance_embed else "schnell"
    flux_sd = tiny_transformer_state_dict(seed, guidance_embed)
    ae_sd = tiny_ae_state_dict(seed)
    transformer = out / f"flux1-tiny-{variant}.safetensors"
    save_file_atomic(flux_sd, transformer, metadata={"format": "pt"})
    ae = out / "ae.safetensors"
    save_file_atomic(ae_sd, ae, metadata={"format": "pt"})
    clip_l, t5xxl = write_tiny_text_encoders(out, seed)

    pipe = out / f"FLUX.1-tiny-{variant}"
    write_json(pipe / "model_index.json", MODEL_INDEX)
    write_json(pipe / "scheduler" / "scheduler_config.json", scheduler_config(guidance_embed))
    write_json(pipe / "transformer" / "config.json", transformer_config(tiny_flux_params(guidance_embed)))
    _write_sharded(transformer_bfl_to_diffusers(flux_sd), pipe / "transformer", "diffusion_pytorch_model")
    write_json(pipe / "vae" / "config.json", vae_config(TINY_AE))
    save_file_atomic(ae_bfl_to_diffusers(ae_sd), pipe / "vae" / "diffusion_pytorch_model.safetensors")
    write_tiny_text_encoders_diffusers(pipe, seed)
    return TinyCheckpoints(transformer=transformer, ae=ae, clip_l=clip_l, t5xxl=t5xxl, diffusers=pipe,
                           guidance_embed=guidance_embed)
