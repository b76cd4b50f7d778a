"""Reading FLUX LoRAs in the wild and writing them in each loader's format.

Every format is parsed into one canonical form: `{kohya lora_name: LoRAWeight(down, up, alpha)}` with BFL
(fused) modules, `ΔW = alpha/rank · up @ down` (alpha None = no alpha in the file = scale 1, which is what
ComfyUI, Forge, diffusers and InvokeAI do). Formats understood:

- kohya sd-scripts: `lora_unet_…`, `lora_te1_…` (`lora_te_`), `lora_te3_…` (`lora_te2_`) with
  `.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- ComfyUI / BFL: `diffusion_model.<bfl path>` (or `model.diffusion_model.` or bare BFL names) with
  `lora_down/lora_up` or `lora_A/lora_B`, optional `.alpha`;
- diffusers / PEFT / ai-toolkit: `transformer.<diffusers path>.lora_A/lora_B.weight` (also `lora.down/up`,
  `base_model.model.` prefix), optional `.alpha` keys or PEFT `lora_adapter_metadata`; q/k/v(/mlp) parts are
  fused back into BFL's `qkv` / `linear1` (concatenated downs, block-diagonal up);
- XLabs: `double_blocks.{i}.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (no alpha);
- OneTrainer / SimpleTuner LyCORIS: `lora_transformer_<diffusers path, . → _>` / `lycoris_…` (kohya suffixes).

Nothing is dropped silently: keys that map to no known module end up in `ParsedLoRA.unknown`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file
import torch

from library.errors import UserError
from library.flux.safetensors_io import read_header, read_metadata
from networks import lora_keys as K
from networks.lora_checks import check_finite, lora_tensors


@dataclass
class LoRAWeight:
    """One LoRA module: `ΔW = (alpha / rank) · up @ down`, down [rank, in], up [out, rank]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None: the file had no alpha, scale 1

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass
class ParsedLoRA:
    weights: dict[str, LoRAWeight]
    unknown: list[str] = field(default_factory=list)  # keys no module was found for
    formats: set[str] = field(default_factory=set)  # which key styles were seen


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA .safetensors (strict header checks, pickles refused)."""
    read_header(path)
    return load_file(str(path)), read_metadata(path)


def read_lora(path: str | Path) -> ParsedLoRA:
    sd, meta = load_lora_file(path)
    parsed = parse_lora(sd, meta, source=str(path))
    if not parsed.weights:
        raise UserError(f"{path}: no LoRA modules found (first keys: {', '.join(sorted(sd)[:3])})")
    check_finite(lora_tensors(parsed.weights), str(path))  # a NaN LoRA never reaches a merge or an image
    return parsed


# --- parsing ---------------------------------------------------------------------------------------------

_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "down.weight", "lora_A.default.weight")
_UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight", "up.weight", "lora_B.default.weight")
_XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
          "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"}


def split_suffix(key: str) -> tuple[str, str] | None:
    for role, suffixes in (("down", _DOWN), ("up", _UP), ("alpha", ("alpha",))):
        for s in suffixes:
            if key.endswith("." + s):
                return key[: -len(s) - 1], role
    return None


@dataclass
class _Slot:
    """A module or a diffusers part collected while parsing."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


def classify_stem(stem: str) -> tuple[str, str, int | None] | None:
    """Module stem → (kohya lora_name, style, diffusers part index or None)."""
    for flat_prefix in ("lora_transformer_", "lycoris_"):  # OneTrainer / SimpleTuner: diffusers names with _
        if stem.startswith(flat_prefix):
            path = K.diffusers_path_from_flat(stem[len(flat_prefix):])
            return classify_stem("transformer." + path) if path else None
    if stem.startswith(("lora_unet_", "lora_te")):
        got = K.split_kohya_name(stem)
        if got is None:
            return None
        return K.kohya_name(*got), "kohya", None
    for prefix in ("base_model.model.", "transformer.", "text_encoder.", "text_encoder_2."):
        if stem.startswith(prefix):
            return _classify_diffusers(stem, prefix)
    bfl = re.sub(r"^(model\.)?diffusion_model\.", "", stem)
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.processor\.(\w+)", bfl)
    if m:  # XLabs
        kind, i, proc = m.groups()
        path = f"double_blocks.{i}.{_XLABS[proc]}" if kind == "double" and proc in _XLABS else None
        # XLabs' single-block proj_lora acts on linear2's *output*, not as a delta of one Linear: unsupported.
        if kind == "single" and proc == "qkv_lora":
            return K.kohya_name("transformer", f"single_blocks.{i}.linear1"), "xlabs", -2  # rows [0, 3h)
        return (K.kohya_name("transformer", path), "xlabs", None) if path else None
    got = K.split_kohya_name(K.kohya_name("transformer", bfl))
    if got is None:
        return None
    return K.kohya_name(*got), "comfyui", None


def _classify_diffusers(stem: str, prefix: str) -> tuple[str, str, int | None] | None:
    path = stem[len(prefix):]
    if prefix == "base_model.model.":
        prefix = "transformer."
    if prefix == "text_encoder.":
        got = K.split_kohya_name(K.kohya_name("te1", path))
        return (K.kohya_name(*got), "diffusers", None) if got else None
    if prefix == "text_encoder_2.":
        got = K.split_kohya_name(K.kohya_name("te3", path))
        return (K.kohya_name(*got), "diffusers", None) if got else None
    mapped = K.diffusers_to_bfl(path)
    if mapped is None:
        return None
    bfl, split, idx = mapped
    part = {"one": None, "swap": -1}.get(split.kind, idx)  # -1: norm_out, rows to swap back
    return K.kohya_name("transformer", bfl), "diffusers", part


def peft_metadata_alpha(metadata: dict[str, str] | None) -> float | None:
    """A global `lora_alpha` from diffusers' `lora_adapter_metadata`, if any."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    for k, v in cfg.items():
        if k.endswith("lora_alpha") and isinstance(v, (int, float)):
            return float(v)
    return None


def check_pair(name: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None,
               source: str = "LoRA") -> None:
    """A down/up/alpha triple that can form ΔW = alpha/rank · up @ down, else a one-line UserError."""
    if down.ndim != 2 or up.ndim != 2:
        raise UserError(f"{source}: {name}: expected 2-D lora_down/lora_up, got shapes {list(down.shape)} and "
                        f"{list(up.shape)}")
    if down.shape[0] == 0 or up.shape[1] != down.shape[0]:
        raise UserError(f"{source}: {name}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not "
                        "share a rank (up must be [out, rank], down [rank, in]); the file is corrupt")
    if alpha is not None and (alpha.numel() != 1 or not torch.isfinite(alpha.float()).all()):
        raise UserError(f"{source}: {name}: alpha must be one finite number, got shape {list(alpha.shape)}")


def parse_lora(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               source: str = "LoRA") -> ParsedLoRA:
    """Any supported FLUX LoRA state dict → canonical kohya-named, BFL-fused `LoRAWeight`s.

    `source` (the file name) prefixes the message of a malformed pair (ranks of down and up disagree)."""
    slots: dict[tuple[str, int | None], _Slot] = {}
    out = ParsedLoRA(weights={})
    for key, t in sd.items():
        split = split_suffix(key)
        cls = classify_stem(split[0]) if split else None
        if cls is None:
            out.unknown.append(key)
            continue
        name, style, part = cls
        out.formats.add(style)
        slot = slots.setdefault((name, part), _Slot())
        slot.tensors[split[1]] = t
        slot.keys.append(key)
    default_alpha = peft_metadata_alpha(metadata)
    parts: dict[str, dict[int, LoRAWeight]] = {}
    for (name, part), slot in slots.items():
        if "down" not in slot.tensors or "up" not in slot.tensors:
            out.unknown.extend(slot.keys)  # half a LoRA pair cannot be applied
            continue
        a = slot.tensors.get("alpha")
        check_pair(split_suffix(slot.keys[0])[0], slot.tensors["down"], slot.tensors["up"], a, source)
        alpha = float(a.float().item()) if a is not None else default_alpha
        w = LoRAWeight(slot.tensors["down"], slot.tensors["up"], alpha)
        if part is None:
            out.weights[name] = w
        elif part == -1:  # diffusers norm_out.linear: rows of up are [scale; shift]
            out.weights[name] = LoRAWeight(w.down, K.swap_halves(w.up), w.alpha)
        elif part == -2:  # XLabs single-block qkv: first 3h rows of linear1 (mlp rows = 4h, FLUX's ratio)
            h = w.down.shape[1]
            out.weights[name] = fuse_parts({0: w}, [w.up.shape[0], int(K.MLP_RATIO * h)])
        else:
            parts.setdefault(name, {})[part] = w
    for name, ps in parts.items():
        comp, path = K.split_kohya_name(name)
        spl = K.bfl_to_diffusers(path)[0]
        in_f = next(iter(ps.values())).down.shape[1]
        rows = K.fused_rows(spl, {i: p.up.shape[0] for i, p in ps.items()}, in_f)
        out.weights[name] = fuse_parts(ps, rows)
    return out


# --- fusing and splitting q/k/v(/mlp) --------------------------------------------------------------------

def fuse_parts(parts: dict[int, LoRAWeight], rows: list[int]) -> LoRAWeight:
    """Fuse diffusers parts into one BFL LoRA whose ΔW rows are the parts' ΔW (missing parts: zero rows).

    A shared down (same tensor for every part, as a dense split writes) stays shared: exact round trip.
    Otherwise down = cat(downs) and up is block-diagonal. Equal part scales keep alpha = scale · rank;
    different scales are baked into the up blocks with alpha = rank.
    """
    ws = [parts[i] for i in sorted(parts)]
    same_scale = all(math.isclose(w.scale, ws[0].scale, rel_tol=1e-6) for w in ws)
    d0 = ws[0].down
    shared = same_scale and all(w.down.shape == d0.shape and torch.equal(w.down, d0) for w in ws)
    dtype = torch.promote_types(d0.dtype, ws[0].up.dtype)
    if shared:
        r = d0.shape[0]
        up = torch.zeros(sum(rows), r, dtype=ws[0].up.dtype)
        offs = [sum(rows[:i]) for i in range(len(rows))]
        for i, w in parts.items():
            up[offs[i]: offs[i] + rows[i]] = w.up
        alphas = {w.alpha for w in ws}
        alpha = ws[0].alpha if len(alphas) == 1 else ws[0].scale * r
        return LoRAWeight(d0.clone(), up, alpha)
    rank = sum(w.rank for w in ws)
    down = torch.cat([w.down for w in ws], dim=0)
    up = torch.zeros(sum(rows), rank, dtype=dtype if not same_scale else ws[0].up.dtype)
    col = 0
    for i in sorted(parts):
        w, r0 = parts[i], sum(rows[:i])
        blk = w.up if same_scale else w.up.float() * w.scale
        up[r0: r0 + rows[i], col: col + w.rank] = blk.to(up.dtype)
        col += w.rank
    alpha = ws[0].scale * rank if same_scale else float(rank)
    return LoRAWeight(down, up, alpha)


def split_fused(w: LoRAWeight, rows: list[int]) -> list[LoRAWeight]:
    """Split a fused LoRA into per-part LoRAs with the same ΔW rows.

    Block-sparse up (each rank column used by one part only, every part non-empty) → each part keeps its
    own columns (the exact inverse of `fuse_parts`); otherwise every part shares the whole down.
    """
    offs = [sum(rows[:i]) for i in range(len(rows))]
    blocks = [w.up[o: o + n] for o, n in zip(offs, rows)]
    used = [(b != 0).any(dim=0) for b in blocks]
    disjoint = all(u.any() for u in used) and int(sum(u.int() for u in used).max()) <= 1
    if len(rows) > 1 and disjoint:
        res = []
        for b, u in zip(blocks, used):
            cols = u.nonzero().flatten()
            res.append(LoRAWeight(w.down[cols].clone(), b[:, cols].clone(), w.scale * len(cols)))
        return res
    return [LoRAWeight(w.down, b.clone(), w.alpha) for b in blocks]


# --- writing ---------------------------------------------------------------------------------------------

def _own(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses shared storage)."""
    t = t.detach().to("cpu", dtype=dtype or t.dtype)
    return t.contiguous().clone()


def to_kohya(weights: dict[str, LoRAWeight], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya keys; `.alpha` always written, as a 0-dim float32 (exact in every loader)."""
    sd: dict[str, torch.Tensor] = {}
    for name, w in sorted(weights.items()):
        sd[f"{name}.lora_down.weight"] = _own(w.down, dtype)
        sd[f"{name}.lora_up.weight"] = _own(w.up, dtype)
        sd[f"{name}.alpha"] = torch.tensor(float(w.rank if w.alpha is None else w.alpha), dtype=torch.float32)
    return sd


def to_comfyui(weights: dict[str, LoRAWeight], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's own naming: `diffusion_model.<bfl path>.lora_up/lora_down.weight` + `.alpha`."""
    sd: dict[str, torch.Tensor] = {}
    for name, w in sorted(weights.items()):
        comp, path = K.split_kohya_name(name)
        stem = f"diffusion_model.{path}" if comp == "transformer" else name
        sd[f"{stem}.lora_down.weight"] = _own(w.down, dtype)
        sd[f"{stem}.lora_up.weight"] = _own(w.up, dtype)
        sd[f"{stem}.alpha"] = torch.tensor(float(w.rank if w.alpha is None else w.alpha), dtype=torch.float32)
    return sd


def to_diffusers(weights: dict[str, LoRAWeight], dtype: torch.dtype | None = None,
                 alpha_keys: bool = False) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys (`transformer.…lora_A/lora_B`, `text_encoder.…`).

    By default the scale is baked into lora_B and no `.alpha` is written, which is what InvokeAI and
    ai-toolkit expect (they assume alpha = rank). `alpha_keys=True` writes `.alpha` instead (diffusers and
    ComfyUI read it) and keeps the weights bit-identical.
    """
    sd: dict[str, torch.Tensor] = {}
    for name, w in sorted(weights.items()):
        comp, path = K.split_kohya_name(name)
        if comp != "transformer":
            stems = [("text_encoder." if comp == "te1" else "text_encoder_2.") + path]
            parts = [w]
        else:
            spl, prefix = K.bfl_to_diffusers(path)
            stems = ["transformer." + prefix + p for p in spl.parts]
            if spl.kind == "swap":
                parts = [LoRAWeight(w.down, K.swap_halves(w.up), w.alpha)]
            else:
                parts = split_fused(w, K.part_rows(spl, w.up.shape[0], w.down.shape[1]))
        for stem, p in zip(stems, parts):
            if alpha_keys:
                sd[f"{stem}.lora_A.weight"] = _own(p.down, dtype)
                sd[f"{stem}.lora_B.weight"] = _own(p.up, dtype)
                sd[f"{stem}.alpha"] = torch.tensor(float(p.rank if p.alpha is None else p.alpha))
            else:
                sd[f"{stem}.lora_A.weight"] = _own(p.down, dtype)
                sd[f"{stem}.lora_B.weight"] = _own(p.up.float() * p.scale, dtype or p.up.dtype)
    return sd


WRITERS = {"sd-scripts": to_kohya, "kohya": to_kohya, "comfyui": to_comfyui, "diffusers": to_diffusers,
           "ai-toolkit": to_diffusers, "peft": to_diffusers}
