"""LoRA module names: kohya names ↔ BFL module paths ↔ diffusers (PEFT) module paths.

Design note. The project's canonical LoRA name is kohya's: `lora_unet_` + BFL module path with `.`→`_`
(`lora_unet_double_blocks_0_img_attn_qkv`), `lora_te1_` + CLIP-L path, `lora_te3_` + T5 path. Because `_`
also appears inside BFL names, the reverse mapping (kohya → path) is a table of patterns, not a string
replace. diffusers splits BFL's fused `qkv` (and `linear1` = q,k,v,mlp) into separate modules; each diffusers
module therefore maps to (BFL module, part index, number of parts). Part widths are read from tensor shapes
(qkv rows = 3h; linear1 rows = 3h + m with h = its input width), never hard-coded.
"""

from __future__ import annotations

import re

import torch

from library.flux.convert import DOUBLE_MODULES, OTHER_MODULES, SINGLE_MODULES, Split
from library.flux.geometry import MLP_RATIO  # only used when a split file lacks proj_mlp

PREFIX_TRANSFORMER = "lora_unet_"  # kohya's key prefix of the transformer (the file format)
PREFIX_CLIP = "lora_te1_"
PREFIX_T5 = "lora_te3_"

_DOUBLE_RE = re.compile(r"double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)")
_SINGLE_RE = re.compile(r"single_blocks_(\d+)_(linear1|linear2|modulation_lin)")
_OTHER_TRANSFORMER = {
    "img_in": "img_in", "txt_in": "txt_in",
    "time_in_in_layer": "time_in.in_layer", "time_in_out_layer": "time_in.out_layer",
    "vector_in_in_layer": "vector_in.in_layer", "vector_in_out_layer": "vector_in.out_layer",
    "guidance_in_in_layer": "guidance_in.in_layer", "guidance_in_out_layer": "guidance_in.out_layer",
    "final_layer_linear": "final_layer.linear", "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}
_CLIP_RE = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc1|mlp_fc2)")
_T5_RE = re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention_(?:q|k|v|o)|DenseReluDense_(?:wi_0|wi_1|wo|wi))")

# BFL modules outside the double/single blocks: some loaders drop them (see docs/lora.md).
NON_BLOCK_TRANSFORMER = frozenset(_OTHER_TRANSFORMER.values())


def kohya_name(component: str, module_path: str) -> str:
    """`("transformer", "double_blocks.0.img_attn.qkv")` → `lora_unet_double_blocks_0_img_attn_qkv`."""
    prefix = {"transformer": PREFIX_TRANSFORMER, "te1": PREFIX_CLIP, "te3": PREFIX_T5}[component]
    return prefix + module_path.replace(".", "_")


def split_kohya_name(name: str) -> tuple[str, str] | None:
    """`lora_unet_double_blocks_0_img_attn_qkv` → ("transformer", "double_blocks.0.img_attn.qkv"); None if unknown."""
    if name.startswith(PREFIX_TRANSFORMER):
        return _transformer_path(name[len(PREFIX_TRANSFORMER):])
    for prefix, comp in ((PREFIX_CLIP, "te1"), ("lora_te_", "te1")):
        if name.startswith(prefix):
            m = _CLIP_RE.fullmatch(name[len(prefix):])
            if m:
                sub = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
                return comp, f"text_model.encoder.layers.{m.group(1)}.{sub}"
            return None
    # lora_te2_ is how InvokeAI/Forge name T5; kohya writes lora_te3_.
    for prefix in (PREFIX_T5, "lora_te2_"):
        if name.startswith(prefix):
            m = _T5_RE.fullmatch(name[len(prefix):])
            if m:
                kind, leaf = m.group(3).split("_", 1)
                return "te3", f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{kind}.{leaf}"
            return None
    return None


def _transformer_path(rest: str) -> tuple[str, str] | None:
    m = _DOUBLE_RE.fullmatch(rest)
    if m:
        i, stream, part = m.groups()
        a, b = part.split("_", 1)
        return "transformer", f"double_blocks.{i}.{stream}_{a}.{b}"
    m = _SINGLE_RE.fullmatch(rest)
    if m:
        i, part = m.groups()
        return "transformer", f"single_blocks.{i}." + ("modulation.lin" if part == "modulation_lin" else part)
    if rest in _OTHER_TRANSFORMER:
        return "transformer", _OTHER_TRANSFORMER[rest]
    return None


def is_block_module(module_path: str) -> bool:
    return module_path.startswith(("double_blocks.", "single_blocks."))


# --- BFL ↔ diffusers -------------------------------------------------------------------------------------

# The BFL <-> diffusers module table is library/flux/convert.py's (one copy for checkpoints and LoRAs).
_DOUBLE_TABLE, _SINGLE_TABLE, _OTHER_TABLE = DOUBLE_MODULES, SINGLE_MODULES, OTHER_MODULES


def bfl_to_diffusers(module_path: str) -> tuple[Split, str] | None:
    """The diffusers split of a BFL module and the diffusers prefix its parts live under."""
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", module_path)
    if m and m.group(2) in _DOUBLE_TABLE:
        return _DOUBLE_TABLE[m.group(2)], f"transformer_blocks.{m.group(1)}."
    m = re.fullmatch(r"single_blocks\.(\d+)\.(.+)", module_path)
    if m and m.group(2) in _SINGLE_TABLE:
        return _SINGLE_TABLE[m.group(2)], f"single_transformer_blocks.{m.group(1)}."
    if module_path in _OTHER_TABLE:
        return _OTHER_TABLE[module_path], ""
    return None


def diffusers_to_bfl(diffusers_path: str) -> tuple[str, Split, int] | None:
    """`transformer_blocks.0.attn.to_k` → ("double_blocks.0.img_attn.qkv", split, 1)."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", diffusers_path)
    if m:
        table, prefix = _DOUBLE_TABLE, f"double_blocks.{m.group(1)}."
        rest = m.group(2)
    else:
        m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", diffusers_path)
        if m:
            table, prefix, rest = _SINGLE_TABLE, f"single_blocks.{m.group(1)}.", m.group(2)
        else:
            table, prefix, rest = _OTHER_TABLE, "", diffusers_path
    for bfl, split in table.items():
        if rest in split.parts:
            return prefix + bfl, split, split.parts.index(rest)
    return None


def part_rows(split: Split, out_features: int, in_features: int) -> list[int]:
    """Row counts of each diffusers part inside the fused BFL weight [out, in]."""
    if split.kind == "qkv":
        return [out_features // 3] * 3
    if split.kind == "linear1":
        h = in_features  # linear1 maps hidden → 3·hidden + mlp
        return [h, h, h, out_features - 3 * h]
    return [out_features]


def fused_rows(split: Split, part_rows_known: dict[int, int], in_features: int,
               mlp_ratio: float = MLP_RATIO) -> list[int]:
    """Row counts of every part when only some parts are present (missing q/k/v rows = hidden)."""
    if split.kind == "qkv":
        h = next(iter(part_rows_known.values()))
        return [part_rows_known.get(i, h) for i in range(3)]
    if split.kind == "linear1":
        h = in_features
        return [h, h, h, part_rows_known.get(3, int(h * mlp_ratio))]
    return [part_rows_known[0]]


def swap_halves(t):
    """BFL final_layer.adaLN_modulation emits [shift; scale], diffusers norm_out.linear [scale; shift]."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_path_from_flat(flat: str) -> str | None:
    """OneTrainer / SimpleTuner-LyCORIS names: `transformer_blocks_0_attn_to_q` → `transformer_blocks.0.attn.to_q`."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)_(\d+)_(.+)", flat)
    if m:
        table = _DOUBLE_TABLE if m.group(1) == "transformer_blocks" else _SINGLE_TABLE
        parts = {p.replace(".", "_"): p for s in table.values() for p in s.parts}
        return f"{m.group(1)}.{m.group(2)}.{parts[m.group(3)]}" if m.group(3) in parts else None
    parts = {p.replace(".", "_"): p for s in _OTHER_TABLE.values() for p in s.parts}
    return parts.get(flat)
