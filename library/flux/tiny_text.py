"""Tiny, seeded, random CLIP-L and T5 text encoders in the layouts users have them.

The vocabularies and CLIP's 77 positions are the real ones, so the shipped tokenizers work unchanged; only
the widths and depths are tiny. Weights are drawn at unit gain (embeddings std 1, linears std 1/sqrt(fan_in))
rather than the real models' small init, so attention mixes tokens strongly and the outputs clearly depend
on the prompt: the end-to-end parity tests need an image that changes when the prompt changes.

Layouts written:
- ComfyUI single files: `clip_l.safetensors` (`text_model.…` + `text_projection.weight`, fp16) and
  `t5xxl_fp16.safetensors` (`shared.weight`, `encoder.block.…`, `encoder.final_layer_norm.weight`, fp16).
- diffusers pipeline parts: `text_encoder/`, `text_encoder_2/` (sharded, with its index), `tokenizer/`,
  `tokenizer_2/`, with the same tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from library.atomic import write_text_atomic
from library.flux.safetensors_io import save_file_atomic
from library.flux.text_encoders import (
    ClipSizes,
    T5Sizes,
    clip_config,
    t5_config,
    tokenizer_dir,
)

TINY_CLIP = ClipSizes(vocab=49408, width=64, layers=2, intermediate=128, positions=77, projection=64)
# d_kv * heads (64) differs from d_model (48) on purpose: the loader must read d_kv from the shapes.
TINY_T5 = T5Sizes(vocab=32128, d_model=48, layers=2, heads=4, d_kv=16, d_ff=96, num_buckets=32)

CLIP_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl_fp16.safetensors"
_STORE_DTYPE = torch.float16  # as the ComfyUI files ship


def tiny_text_dims() -> tuple[int, int]:
    """(CLIP width = FLUX vec_in_dim, T5 d_model = FLUX context_in_dim) of the tiny encoders."""
    return TINY_CLIP.width, TINY_T5.d_model


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std + mean).to(_STORE_DTYPE)


def _linear(gen: torch.Generator, out_f: int, in_f: int) -> torch.Tensor:
    return _normal(gen, (out_f, in_f), in_f ** -0.5)


def tiny_clip_state_dict(seed: int, sizes: ClipSizes = TINY_CLIP) -> dict[str, torch.Tensor]:
    """ComfyUI `clip_l.safetensors` keys (`text_model.…`, `text_projection.weight`), fp16."""
    gen = torch.Generator().manual_seed(seed)
    w, sd = sizes.width, {}
    sd["text_model.embeddings.token_embedding.weight"] = _normal(gen, (sizes.vocab, w), 1.0)
    sd["text_model.embeddings.position_embedding.weight"] = _normal(gen, (sizes.positions, w), 1.0)
    for i in range(sizes.layers):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = _linear(gen, w, w)
            sd[p + f"self_attn.{proj}.bias"] = _normal(gen, (w,), 0.1)
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + f"{norm}.weight"] = _normal(gen, (w,), 0.1, 1.0)
            sd[p + f"{norm}.bias"] = _normal(gen, (w,), 0.1)
        sd[p + "mlp.fc1.weight"] = _linear(gen, sizes.intermediate, w)
        sd[p + "mlp.fc1.bias"] = _normal(gen, (sizes.intermediate,), 0.1)
        sd[p + "mlp.fc2.weight"] = _linear(gen, w, sizes.intermediate)
        sd[p + "mlp.fc2.bias"] = _normal(gen, (w,), 0.1)
    sd["text_model.final_layer_norm.weight"] = _normal(gen, (w,), 0.1, 1.0)
    sd["text_model.final_layer_norm.bias"] = _normal(gen, (w,), 0.1)
    sd["text_projection.weight"] = _linear(gen, sizes.projection, w)
    return sd


def tiny_t5_state_dict(seed: int, sizes: T5Sizes = TINY_T5) -> dict[str, torch.Tensor]:
    """ComfyUI `t5xxl_fp16.safetensors` keys (`shared.weight`, `encoder.…`), fp16."""
    gen = torch.Generator().manual_seed(seed + 1)
    d, inner, sd = sizes.d_model, sizes.heads * sizes.d_kv, {}
    sd["shared.weight"] = _normal(gen, (sizes.vocab, d), 1.0)
    for i in range(sizes.layers):
        p = f"encoder.block.{i}.layer."
        for proj in ("q", "k", "v"):
            sd[p + f"0.SelfAttention.{proj}.weight"] = _linear(gen, inner, d)
        sd[p + "0.SelfAttention.o.weight"] = _linear(gen, d, inner)
        if i == 0:  # T5 keeps the relative position bias in the first block only
            bias = _normal(gen, (sizes.num_buckets, sizes.heads), 1.0)
            sd[p + "0.SelfAttention.relative_attention_bias.weight"] = bias
        sd[p + "0.layer_norm.weight"] = _normal(gen, (d,), 0.1, 1.0)
        sd[p + "1.DenseReluDense.wi_0.weight"] = _linear(gen, sizes.d_ff, d)
        sd[p + "1.DenseReluDense.wi_1.weight"] = _linear(gen, sizes.d_ff, d)
        sd[p + "1.DenseReluDense.wo.weight"] = _linear(gen, d, sizes.d_ff)
        sd[p + "1.layer_norm.weight"] = _normal(gen, (d,), 0.1, 1.0)
    sd["encoder.final_layer_norm.weight"] = _normal(gen, (d,), 0.1, 1.0)
    return sd


def write_tiny_text_encoders(out_dir: Path, seed: int) -> tuple[Path, Path]:
    """Write `clip_l.safetensors` and `t5xxl_fp16.safetensors` into out_dir; returns (clip path, t5 path)."""
    out_dir = Path(out_dir)
    clip_path, t5_path = out_dir / CLIP_FILE, out_dir / T5_FILE
    save_file_atomic(tiny_clip_state_dict(seed), clip_path)
    save_file_atomic(tiny_t5_state_dict(seed), t5_path)
    return clip_path, t5_path


def write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(name: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in tokenizer_dir(name).iterdir():
        if src.suffix in (".json", ".txt"):
            shutil.copyfile(src, dest / src.name)


def write_tiny_text_encoders_diffusers(pipeline_dir: Path, seed: int) -> None:
    """Write text_encoder/, text_encoder_2/ (two shards + index), tokenizer/ and tokenizer_2/ into a
    diffusers pipeline folder, with the same tensors as `write_tiny_text_encoders(…, seed)`."""
    pipeline_dir = Path(pipeline_dir)
    clip_sd = tiny_clip_state_dict(seed)
    clip_sd.pop("text_projection.weight")  # diffusers' text_encoder is a CLIPTextModel, without projection
    save_file_atomic(clip_sd, pipeline_dir / "text_encoder" / "model.safetensors")
    write_json(pipeline_dir / "text_encoder" / "config.json", clip_config(TINY_CLIP).to_dict())

    t5_sd = tiny_t5_state_dict(seed)
    names = sorted(t5_sd)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file_atomic({k: t5_sd[k] for k in shard}, pipeline_dir / "text_encoder_2" / file)
        weight_map.update({k: file for k in shard})
        total += sum(t5_sd[k].numel() * t5_sd[k].element_size() for k in shard)
    write_json(pipeline_dir / "text_encoder_2" / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(pipeline_dir / "text_encoder_2" / "config.json", t5_config(TINY_T5).to_dict())

    _copy_tokenizer("clip_l", pipeline_dir / "tokenizer")
    _copy_tokenizer("t5_v1_1_xxl", pipeline_dir / "tokenizer_2")

