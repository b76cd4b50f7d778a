"""diffusers <-> BFL key conversion for the FLUX transformer and autoencoder, exact in both directions.

The transformer table is lora-formats.md §5: diffusers splits BFL's fused `qkv` (q|k|v rows) and the single
blocks' `linear1` (q|k|v|mlp rows), and stores `final_layer.adaLN_modulation.1` as [scale; shift] where BFL
has [shift; scale]. The AE differs only in names, in the reversed order of the decoder's up blocks and in
the mid attention's q/k/v/proj_out being 1x1 convolutions in BFL and Linear layers in diffusers.
"""

from __future__ import annotations

import re

import torch

# BFL prefix -> diffusers prefix for modules that map one to one (weight and bias alike).
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {
    "linear2": "proj_out", "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


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
