"""diffusers <-> BFL key conversion for the FLUX transformer and autoencoder, exact in both directions.

The transformer table is lora-formats.md §5: diffusers splits BFL's fused `qkv` (q|k|v rows) and the single
blocks' `linear1` (q|k|v|mlp rows), and stores `final_layer.adaLN_modulation.1` as [scale; shift] where BFL
has [shift; scale]. The AE differs only in names, in the reversed order of the decoder's up blocks and in
the mid attention's q/k/v/proj_out being 1x1 convolutions in BFL and Linear layers in diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Split:
    """How a BFL Linear appears in diffusers: `parts` diffusers names, rows split as given by `kind`."""

    parts: tuple[str, ...]
    kind: str  # "one" (1:1), "qkv" (3 equal), "linear1" (h,h,h,m), "swap" (norm_out: halves swapped)


# The one BFL <-> diffusers table of FLUX's Linear modules (networks/lora_keys.py maps LoRA names with it).
DOUBLE_MODULES = {  # under double_blocks.{i}. <-> transformer_blocks.{i}.
    "img_attn.qkv": Split(("attn.to_q", "attn.to_k", "attn.to_v"), "qkv"),
    "txt_attn.qkv": Split(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "qkv"),
    "img_attn.proj": Split(("attn.to_out.0",), "one"),
    "txt_attn.proj": Split(("attn.to_add_out",), "one"),
    "img_mlp.0": Split(("ff.net.0.proj",), "one"),
    "img_mlp.2": Split(("ff.net.2",), "one"),
    "txt_mlp.0": Split(("ff_context.net.0.proj",), "one"),
    "txt_mlp.2": Split(("ff_context.net.2",), "one"),
    "img_mod.lin": Split(("norm1.linear",), "one"),
    "txt_mod.lin": Split(("norm1_context.linear",), "one"),
}
SINGLE_MODULES = {  # under single_blocks.{i}. <-> single_transformer_blocks.{i}.
    "linear1": Split(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1"),
    "linear2": Split(("proj_out",), "one"),
    "modulation.lin": Split(("norm.linear",), "one"),
}
OTHER_MODULES = {  # outside the blocks
    "img_in": Split(("x_embedder",), "one"),
    "txt_in": Split(("context_embedder",), "one"),
    "time_in.in_layer": Split(("time_text_embed.timestep_embedder.linear_1",), "one"),
    "time_in.out_layer": Split(("time_text_embed.timestep_embedder.linear_2",), "one"),
    "vector_in.in_layer": Split(("time_text_embed.text_embedder.linear_1",), "one"),
    "vector_in.out_layer": Split(("time_text_embed.text_embedder.linear_2",), "one"),
    "guidance_in.in_layer": Split(("time_text_embed.guidance_embedder.linear_1",), "one"),
    "guidance_in.out_layer": Split(("time_text_embed.guidance_embedder.linear_2",), "one"),
    "final_layer.linear": Split(("proj_out",), "one"),
    "final_layer.adaLN_modulation.1": Split(("norm_out.linear",), "swap"),
}
# The QK-norm scales (parameters, not Linears): BFL name -> diffusers name.
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def _one_to_one(table: dict[str, Split]) -> dict[str, str]:
    return {bfl: split.parts[0] for bfl, split in table.items() if split.kind == "one"}


# BFL prefix -> diffusers prefix for modules that map one to one (weight and bias alike).
_TOP = _one_to_one(OTHER_MODULES)
_DOUBLE = {**_one_to_one(DOUBLE_MODULES), **_DOUBLE_NORMS}
_DOUBLE_QKV = {bfl: split.parts for bfl, split in DOUBLE_MODULES.items() if split.kind == "qkv"}
_SINGLE = {**_one_to_one(SINGLE_MODULES), **_SINGLE_NORMS}
_SINGLE_LINEAR1 = SINGLE_MODULES["linear1"].parts


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _rename_map(n_double: int, n_single: int) -> dict[str, str]:
    """Full BFL tensor name -> diffusers tensor name for the one-to-one modules."""
    out = {}
    for bfl, dif in _TOP.items():
        for s in (".weight", ".bias"):
            out[bfl + s] = dif + s
    for i in range(n_double):
        for bfl, dif in _DOUBLE.items():
            suffixes = ("",) if bfl.endswith(".scale") else (".weight", ".bias")
            for s in suffixes:
                out[f"double_blocks.{i}.{bfl}{s}"] = f"transformer_blocks.{i}.{dif}{s}"
    for i in range(n_single):
        for bfl, dif in _SINGLE.items():
            suffixes = ("",) if bfl.endswith(".scale") else (".weight", ".bias")
            for s in suffixes:
                out[f"single_blocks.{i}.{bfl}{s}"] = f"single_transformer_blocks.{i}.{dif}{s}"
    return out


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def transformer_bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL state dict -> diffusers FluxTransformer2DModel state dict. Unknown keys are kept unchanged."""
    n_double = _count(sd, r"double_blocks\.(\d+)\.")
    n_single = _count(sd, r"single_blocks\.(\d+)\.")
    hidden = sd["img_in.weight"].shape[0]
    names = _rename_map(n_double, n_single)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in names:
            out[names[key]] = _swap_halves(t) if key.startswith("final_layer.adaLN") else t
            continue
        m = re.match(r"double_blocks\.(\d+)\.(img_attn\.qkv|txt_attn\.qkv)\.(weight|bias)$", key)
        if m:
            for part, chunk in zip(_DOUBLE_QKV[m.group(2)], t.split(hidden, dim=0)):
                out[f"transformer_blocks.{m.group(1)}.{part}.{m.group(3)}"] = chunk
            continue
        m = re.match(r"single_blocks\.(\d+)\.linear1\.(weight|bias)$", key)
        if m:
            sizes = [hidden, hidden, hidden, t.shape[0] - 3 * hidden]
            for part, chunk in zip(_SINGLE_LINEAR1, t.split(sizes, dim=0)):
                out[f"single_transformer_blocks.{m.group(1)}.{part}.{m.group(2)}"] = chunk
            continue
        if key.startswith("final_layer.adaLN_modulation.1."):
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = _swap_halves(t)
            continue
        out[key] = t
    return out


def transformer_diffusers_plan(keys) -> dict[str, tuple[tuple[str, ...], bool]]:
    """BFL key -> (diffusers keys to concatenate along dim 0, swap halves?) for a diffusers transformer.

    A plan rather than tensors, so a loader can read and convert one fused group at a time.
    Unknown keys map to themselves (the strict key check downstream reports them).
    """
    keys = list(keys)
    n_double = _count(keys, r"transformer_blocks\.(\d+)\.")
    n_single = _count(keys, r"single_transformer_blocks\.(\d+)\.")
    names = {dif: bfl for bfl, dif in _rename_map(n_double, n_single).items()}
    for s in ("weight", "bias"):
        names[f"norm_out.linear.{s}"] = f"final_layer.adaLN_modulation.1.{s}"
    fused: dict[str, list[str]] = {}  # BFL key -> its diffusers parts, in row order
    for i in range(n_double):
        for bfl, parts in _DOUBLE_QKV.items():
            for s in ("weight", "bias"):
                fused[f"double_blocks.{i}.{bfl}.{s}"] = [f"transformer_blocks.{i}.{p}.{s}" for p in parts]
    for i in range(n_single):
        for s in ("weight", "bias"):
            fused[f"single_blocks.{i}.linear1.{s}"] = [f"single_transformer_blocks.{i}.{p}.{s}"
                                                      for p in _SINGLE_LINEAR1]
    present = set(keys)
    plan: dict[str, tuple[tuple[str, ...], bool]] = {}
    consumed: set[str] = set()
    for bfl, parts in fused.items():
        if all(p in present for p in parts):
            plan[bfl] = (tuple(parts), False)
            consumed.update(parts)
    for key in keys:
        if key not in consumed:
            plan[names.get(key, key)] = ((key,), key.startswith("norm_out.linear"))
    return plan


def apply_plan_entry(parts: list[torch.Tensor], swap: bool) -> torch.Tensor:
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return _swap_halves(t) if swap else t


def transformer_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL state dict. Unknown keys are kept unchanged."""
    return {bfl: apply_plan_entry([sd[k] for k in srcs], swap)
            for bfl, (srcs, swap) in transformer_diffusers_plan(sd).items()}


# ---- autoencoder ------------------------------------------------------------------------------------------
_AE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "nin_shortcut": "conv_shortcut"}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ae_name_bfl_to_diffusers(key: str, n_up: int) -> str:
    """One AE tensor name, BFL -> diffusers (the decoder's up.{i} is up_blocks.{n_up-1-i})."""
    rules = [
        (r"(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_AE_RESNET[m[3]]}."),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv."),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.",
         lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.{_AE_RESNET[m[3]]}."),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.",
         lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv."),
        (r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_AE_RESNET[m[3]]}."),
        (r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.", lambda m: f"{m[1]}.mid_block.attentions.0.{_AE_ATTN[m[2]]}."),
    ]
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return repl(m) + key[m.end():]
    return key


def _is_ae_attn_matrix(bfl_key: str) -> bool:
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key) is not None


def ae_bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL AE state dict -> diffusers AutoencoderKL state dict."""
    n_up = _count(sd, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, t in sd.items():
        out[_ae_name_bfl_to_diffusers(key, n_up)] = t[:, :, 0, 0] if _is_ae_attn_matrix(key) else t
    return out


def ae_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> BFL AE state dict (inverse of ae_bfl_to_diffusers)."""
    n_up = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    inverse_resnet = {v: k for k, v in _AE_RESNET.items()}
    inverse_attn = {v: k for k, v in _AE_ATTN.items()}
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{inverse_resnet[m[3]]}."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"encoder.down.{m[1]}.downsample.conv."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{inverse_resnet[m[3]]}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{inverse_resnet[m[3]]}."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{inverse_attn[m[2]]}."),
    ]
    out = {}
    for key, t in sd.items():
        new = key
        for pattern, repl in rules:
            m = re.match(pattern, key)
            if m:
                new = repl(m) + key[m.end():]
                break
        out[new] = t[:, :, None, None] if _is_ae_attn_matrix(new) and t.ndim == 2 else t
    return out


def is_diffusers_transformer(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def is_diffusers_ae(keys) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys)
