"""Build the models for training in a named, ordered sequence.

    load (meta device -> strict load in host memory, fp8 storage chosen at load so bf16 weights never sit
    in memory) -> freeze -> [caches filled, text encoders freed] -> [--base_weights merged; --fp8_matmul
    quantises the block Linears] -> inject LoRA -> onto the device (block
    swap keeps the swapped blocks' frozen weights in host memory) -> gradient checkpointing -> torch.compile

`accelerator.prepare` (the optimizer) follows in the trainer. The text encoders and the AE are loaded
only when something needs them (caching, live encoding, sample images) and freed when nothing does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.flux.compile import apply_compile
from library.flux.loading import load_autoencoder, load_transformer
from library.flux.model import FP8_DTYPE, Flux, apply_fp8_matmul
from library.flux.text_encoders import FluxTextEncoders, default_t5_max_length
from library.train.config import TrainConfig
from library.train.optim import parse_kv_args
from library.train.precision import Dtypes
from networks import lora_flux
from networks.lora_flux import merge_lora_into_models

log = logging.getLogger(__name__)


@dataclass
class Models:
    transformer: torch.nn.Module
    ae: torch.nn.Module | None
    text: Any | None  # FluxTextEncoders
    guidance_embed: bool
    t5_max_length: int


def required_path(path: str | None, flag: str) -> str:
    if not path:
        raise UserError(f"command line: --{flag} is required (a .safetensors file or a diffusers folder)")
    return path


def load_models(cfg: TrainConfig, dtypes: Dtypes, device: torch.device, need_text: bool, need_ae: bool) -> Models:
    m = cfg.model
    # The transformer waits in host memory while the text encoders and the AE fill the caches on the device
    # (kohya does the same); `to_device` moves it once they are freed.
    transformer = load_transformer(required_path(m.pretrained_model_name_or_path, "pretrained_model_name_or_path"),
                                   "cpu", dtypes.compute, fp8=dtypes.fp8_base)
    transformer.requires_grad_(False)
    transformer.eval()  # FLUX has no dropout/batch-norm; eval keeps that explicit
    guidance = bool(transformer.params.guidance_embed)
    t5_len = m.t5xxl_max_token_length or default_t5_max_length(guidance)
    text = FluxTextEncoders.load(required_path(m.clip_l, "clip_l"), required_path(m.t5xxl, "t5xxl"), device,
                                 dtypes.text) \
        if need_text else None
    if text is not None:
        text.clip.requires_grad_(False)
        text.t5.requires_grad_(False)
    ae = load_autoencoder(required_path(m.ae, "ae"), device, dtypes.ae) if need_ae else None
    if ae is not None:
        ae.requires_grad_(False)
    return Models(transformer, ae, text, guidance, t5_len)


def merge_base_weights(cfg: TrainConfig, models: Models) -> None:
    """--base_weights: LoRAs merged into the frozen transformer before the new LoRA is injected."""
    files, mults = cfg.network.base_weights, cfg.network.base_weights_multiplier
    if not files:
        return
    if mults and len(mults) != len(files):
        raise UserError("command line: --base_weights_multiplier needs one value per --base_weights file")
    if cfg.precision.fp8_base:
        raise UserError("command line: --base_weights cannot be merged into --fp8_base weights; merge first "
                        "with networks/flux_merge_lora.py")
    pairs = [(Path(f), float(mults[i]) if mults else 1.0) for i, f in enumerate(files)]
    merge_lora_into_models(models.transformer, None, None, pairs)


def quantize_fp8_matmul(transformer: Flux, device: torch.device) -> None:
    """--fp8_matmul: the block Linears become per-row scaled e4m3 (quantised on the GPU, one weight at a
    time, and kept in host memory until `transformer_to_device`)."""
    start = time.perf_counter()
    check_fp8_matmul(device)
    names = apply_fp8_matmul(transformer, device if device.type == "cuda" else None)
    log.info("--fp8_matmul: %d block Linears quantised to e4m3 with per-row scales in %.1f s", len(names),
             time.perf_counter() - start)


def check_fp8_matmul(device: torch.device) -> None:
    """A one-line error, before any training, on a device whose torch has no row-scaled fp8 matmul."""
    a = torch.ones(16, 16, device=device).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        what = (f"{torch.cuda.get_device_name(device)} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
                if device.type == "cuda" else device.type)
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(f"command line: --fp8_matmul: this device, {what}, has no row-scaled fp8 matmul "
                        f"({first}); it needs compute capability 8.9+ (RTX 40xx, L40, H100); use --fp8_base") \
            from None


def transformer_to_device(cfg: TrainConfig, transformer: torch.nn.Module, device: torch.device) -> None:
    """After caching: the transformer onto the device; with --blocks_to_swap the swapped blocks stay behind."""
    if cfg.memory.blocks_to_swap and device.type != "cpu":
        transformer.enable_block_swap(cfg.memory.blocks_to_swap, device)
    else:
        transformer.to(device)


def network_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """--network_args key=value strings -> keyword arguments (values stay strings, as kohya passes them)."""
    out = {}
    for item in cfg.network.network_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"command line: --network_args: expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def inject_lora(cfg: TrainConfig, models: Models, train_clip: bool, dtypes: Dtypes) -> tuple[Any, list[str]]:
    """Create the LoRA (fresh, or shaped like --network_weights with --dim_from_weights) and wrap the Linears."""
    n = cfg.network
    clip = models.text.clip if (train_clip and models.text is not None) else None
    t5 = models.text.t5 if models.text is not None else None
    kwargs = network_kwargs(cfg)
    if n.dim_from_weights:
        if not n.network_weights:
            raise UserError("command line: --dim_from_weights needs --network_weights")
        network = lora_flux.create_network_from_weights(1.0, n.network_weights, models.transformer, clip, t5,
                                                        **kwargs)
    else:
        network = lora_flux.create_network(1.0, n.network_dim, n.network_alpha, models.transformer, clip, t5,
                                           neuron_dropout=n.network_dropout, **kwargs)
    names = network.apply_to(text_encoder=train_clip, transformer=not n.network_train_text_encoder_only)
    if n.network_weights and not n.dim_from_weights:
        network.load_weights(n.network_weights)
    network.to(dtype=dtypes.network)
    network.train()
    return network, names


def apply_memory_and_speed(cfg: TrainConfig, transformer: torch.nn.Module, device: torch.device) -> None:
    m = cfg.memory
    if cfg.speed.xformers:
        transformer.set_attn_backend("xformers")  # UserError when xformers is not installed
    if m.blocks_to_swap and device.type == "cpu":
        log.warning("--blocks_to_swap %d: training on the CPU, nothing to swap; ignored", m.blocks_to_swap)
    if m.gradient_checkpointing or m.cpu_offload_checkpointing or m.gradient_checkpointing_blocks is not None:
        transformer.enable_gradient_checkpointing(cpu_offload=m.cpu_offload_checkpointing,
                                                  blocks=m.gradient_checkpointing_blocks)
    if cfg.speed.torch_compile:
        # Regional compilation (library/flux/compile.py): one graph per block type, reused by every block;
        # checkpointing and block swap keep running between blocks. Last, after the LoRA is injected.
        apply_compile(transformer, backend=cfg.speed.dynamo_backend)


def free(*modules: torch.nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            module.to("meta")  # drop the weights now rather than when the last reference goes
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimizer_groups(cfg: TrainConfig, network: Any) -> list[dict]:
    o = cfg.optimizer
    te_lr = list(o.text_encoder_lr) or None
    groups = network.prepare_optimizer_params(te_lr, o.unet_lr, o.learning_rate)
    if not groups:
        raise UserError("command line: no LoRA parameter is trained (every learning rate is 0?)")
    return groups


def kohya_optimizer_args(cfg: TrainConfig) -> dict[str, Any]:
    return parse_kv_args(cfg.optimizer.optimizer_args, "optimizer_args")
