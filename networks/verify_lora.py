"""Check what each FLUX LoRA loader will do with a file: keys used, keys dropped, effective strength.

The rules model ComfyUI 0.3.75, Forge @dfdcbab6, diffusers 0.42.1, InvokeAI 6.14.2 and kohya sd-scripts
@48d368fa as read and tested in ../shared/reference/lora-formats.md §2 (the ComfyUI, diffusers and InvokeAI
rules are exercised against the real loaders by tests/test_lora_interop.py). Exit status 1 when any
checked loader would drop a key, refuse the file or apply a different strength than the file means,
or when a module holds non-finite values; 0 when all use everything as intended; 2 for a bad file.

It also reports the effective norm of each module, ‖(alpha/rank)·up @ down‖_F (the size of the update the
file means), so a user sees that a combined or subtracted LoRA is what they meant: `a - a` is all zeros,
`0.5·a + 0.5·a` has a's norms. `--norms` lists every module (the default prints a summary).

    python networks/verify_lora.py my_lora.safetensors [--loaders comfyui,diffusers] [--json] [--norms]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.errors import run_main  # noqa: E402
from networks import lora_keys as K  # noqa: E402
from networks.lora_algebra import effective_norm  # noqa: E402
from networks.lora_checks import ABSURD, absurd_tensors, first_non_finite  # noqa: E402
from networks.lora_formats import (classify_stem, load_lora_file, parse_lora,  # noqa: E402
                                   peft_metadata_alpha, split_suffix)

LOADERS = ("comfyui", "forge", "diffusers", "invokeai", "kohya")
# InvokeAI's kohya detection: every key must match one of these (flux_kohya_lora_conversion_utils.py)
_INVOKE_KOHYA = [re.compile(p) for p in (
    r"lora_unet_(\w+_blocks)_(\d+)_(img_attn|img_mlp|img_mod|txt_attn|txt_mlp|txt_mod|linear1|linear2|modulation)_?(.*)",
    r"lora_unet_final_layer_(linear|linear1|linear2)_?(.*)",
    r"lora_te1_text_model_encoder_layers_(\d+)_(mlp|self_attn)_(\w+)\.?.*",
    r"lora_te2_encoder_block_(\d+)_layer_(\d+)_(DenseReluDense|SelfAttention)_(\w+)_?(\w+)?\.?.*")]


@dataclass
class Key:
    key: str
    style: str | None  # kohya | comfyui | diffusers | xlabs | None (not understood)
    name: str | None  # canonical kohya module name
    component: str | None
    path: str | None


@dataclass
class Report:
    loader: str
    used: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    rejected: str | None = None  # why the whole file is refused
    strength: dict[str, tuple[float, float]] = field(default_factory=dict)  # module → (loader, intended)
    scale_range: tuple[float, float] | None = None  # min/max alpha/rank this loader applies to used modules
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.dropped and self.rejected is None and not self.strength


def classify(sd: dict) -> list[Key]:
    out = []
    for k in sd:
        split = split_suffix(k)
        cls = classify_stem(split[0]) if split else None
        if cls is None:
            out.append(Key(k, None, None, None, None))
            continue
        comp, path = K.split_kohya_name(cls[0])
        # ComfyUI maps `diffusion_model.<bfl>`; bare or `model.diffusion_model.` BFL names are another style
        style = "bfl" if cls[1] == "comfyui" and not k.startswith("diffusion_model.") else cls[1]
        out.append(Key(k, style, cls[0], comp, path))
    return out


def _comfy(keys: list[Key], loader: str) -> Report:
    r = Report(loader)
    for k in keys:
        ok = (k.style == "kohya" and not k.key.startswith("lora_te2_")) or k.style == "comfyui" or \
             (k.style == "diffusers" and k.component in ("transformer", "te1"))
        (r.used if ok else r.dropped).append(k.key)
        if ok and k.component == "te3":
            r.notes.append("lora_te3_ (T5) keys apply only when a T5 text encoder is loaded")
    if loader == "forge" and len(r.dropped) > 12:
        r.rejected = f"{len(r.dropped)} unmatched keys (> 12): Forge skips the whole LoRA"
    return r


def _diffusers(keys: list[Key]) -> Report:
    r = Report("diffusers")
    if any(k.key.startswith("transformer.") for k in keys):  # PEFT path keeps only transformer./text_encoder.
        for k in keys:
            ok = k.style == "diffusers" and k.component in ("transformer", "te1")
            (r.used if ok else r.dropped).append(k.key)
        return r
    if any(k.key.endswith(".lora_down.weight") for k in keys):  # kohya converter
        for k in keys:
            if k.style in ("kohya", "comfyui") and k.component == "transformer" and not K.is_block_module(k.path):
                r.dropped.append(k.key)  # converted without the transformer. prefix: silently dropped
            elif k.style in ("kohya", "comfyui") and k.component in ("transformer", "te1") and \
                    not k.key.startswith("lora_te2_"):
                r.used.append(k.key)
            elif k.style is None and k.key.startswith("lora_unet_"):
                r.rejected = f"{k.key}: diffusers raises 'Incompatible keys detected'"
                r.dropped.append(k.key)
            else:
                r.dropped.append(k.key)
        if any("linear1" in k for k in r.used):
            r.notes.append("diffusers splits linear1 with FLUX.1's hard-coded widths (3072/12288)")
        return r
    for k in keys:
        (r.used if k.style == "xlabs" else r.dropped).append(k.key)
    return r


def _invokeai(keys: list[Key], sd: dict) -> Report:
    r = Report("invokeai")
    if all(any(p.match(k.key) for p in _INVOKE_KOHYA) for k in keys):
        for k in keys:
            (r.dropped if k.key.startswith("lora_unet_final_layer") else r.used).append(k.key)
        return r
    onetrainer = re.compile(r"lora_transformer_(single_transformer_blocks|transformer_blocks)_(\d+)_(\w+)\.(.*)")
    if all(onetrainer.match(k.key) or any(p.match(k.key) for p in _INVOKE_KOHYA[2:]) for k in keys):
        r.used = [k.key for k in keys]  # InvokeAI's OneTrainer format (blocks only, kohya CLIP/T5 names)
        return r
    peft_suffix = ("lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight")
    if all(k.key.endswith(peft_suffix) for k in keys) and all(k.key.startswith("transformer.") for k in keys):
        has = {k.key.rsplit(".lora", 1)[0] for k in keys}
        if {"transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_q_proj"} <= has:
            if any(k.path == "final_layer.adaLN_modulation.1" for k in keys):
                r.rejected = "norm_out.linear is not supported by InvokeAI's diffusers LoRA loader"
            r.used = [k.key for k in keys]
            r.notes.append("InvokeAI's diffusers path assumes alpha = rank and FLUX.1's width 3072")
            return r
    bad = next((k.key for k in keys if not any(p.match(k.key) for p in _INVOKE_KOHYA)), keys[0].key)
    r.rejected = f"not recognised as a FLUX LoRA (e.g. {bad})"
    r.dropped = [k.key for k in keys]
    return r


def _kohya(keys: list[Key]) -> Report:
    r = Report("kohya")
    names_with_alpha = {k.name for k in keys if k.key.endswith(".alpha")}
    for k in keys:
        ok = k.style == "kohya" and not k.key.startswith("lora_te2_") and k.path is not None and \
            not k.path.startswith("final_layer")
        (r.used if ok else r.dropped).append(k.key)
        if ok and k.name not in names_with_alpha:
            r.rejected = f"{k.name} has no .alpha: kohya raises KeyError"
    return r


def _strengths(rep: Report, sd: dict, meta: dict) -> None:
    """Compare each loader's scale with the file's intended alpha/rank (diffusers semantics for PEFT)."""
    parsed = parse_lora(sd, meta)
    meta_alpha = peft_metadata_alpha(meta)
    has_alpha_keys = any(k.endswith(".alpha") for k in sd)
    used = {n for n, _ in (_stem_name(k) for k in rep.used) if n}
    scales = []
    for name, w in parsed.weights.items():
        scale = w.scale
        # ComfyUI/Forge/InvokeAI ignore PEFT's metadata alpha: they apply scale 1 (alpha = rank)
        if meta_alpha is not None and rep.loader in ("comfyui", "forge", "invokeai") and not has_alpha_keys \
                and abs(w.scale - 1.0) > 1e-6:
            rep.strength[name] = (1.0, w.scale)
            scale = 1.0
        if name in used:
            scales.append(scale)
    rep.scale_range = (min(scales), max(scales)) if scales and rep.rejected is None else None


def _stem_name(key: str) -> tuple[str | None, str | None]:
    split = split_suffix(key)
    cls = classify_stem(split[0]) if split else None
    return (cls[0], cls[1]) if cls else (None, None)


@dataclass
class Norms:
    norm: dict[str, float]  # module -> ‖scale·up@down‖_F
    non_finite: list[str]  # modules whose down, up or alpha hold NaN/inf

    def summary(self) -> str:
        if not self.norm:
            return "no module"
        vals = sorted(v for v in self.norm.values() if math.isfinite(v))
        if not vals:
            return f"{len(self.norm)} modules, none finite"
        top = max((n for n in self.norm if math.isfinite(self.norm[n])), key=self.norm.get)
        total = math.sqrt(sum(v * v for v in vals))
        return (f"{len(self.norm)} modules, total {total:.4g}, min {vals[0]:.4g}, median {vals[len(vals) // 2]:.4g}, "
                f"max {vals[-1]:.4g} ({top})")


def module_norms(path: Path) -> Norms:
    """The effective norm of every module of a LoRA file and the modules with non-finite values."""
    sd, meta = load_lora_file(path)
    parsed = parse_lora(sd, meta, source=str(path))
    norm, bad = {}, []
    for name, w in sorted(parsed.weights.items()):
        finite = bool(torch.isfinite(w.down).all() and torch.isfinite(w.up).all()) and \
            (w.alpha is None or math.isfinite(w.alpha))
        if not finite:
            bad.append(name)
        norm[name] = effective_norm(w) if finite else float("nan")
    return Norms(norm, bad)


def verify(path: Path, loaders: tuple[str, ...] = LOADERS) -> list[Report]:
    sd, meta = load_lora_file(path)
    parse_lora(sd, meta, source=str(path))  # a corrupt pair (ranks of down and up differ) fails here, naming the file
    keys = classify(sd)
    out = []
    for name in loaders:
        rep = {"comfyui": lambda: _comfy(keys, "comfyui"), "forge": lambda: _comfy(keys, "forge"),
               "diffusers": lambda: _diffusers(keys), "invokeai": lambda: _invokeai(keys, sd),
               "kohya": lambda: _kohya(keys)}[name]()
        _strengths(rep, sd, meta)
        rep.notes = sorted(set(rep.notes))
        out.append(rep)
    return out


def value_problems(path: Path) -> list[str]:
    """Non-finite tensors (any loader's output would be NaN: black images) and absurdly large ones."""
    sd, _ = load_lora_file(path)
    bad = first_non_finite(sd)
    out = [f"tensor {bad[0]} holds {bad[1]} values: every loader produces NaN/black images"] if bad else []
    big = absurd_tensors(sd)
    if big:
        out.append(f"{len(big)} tensor(s) hold values beyond ±{ABSURD:g} (first: {big[0]}): images will blow up")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="LoRA .safetensors files")
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma list of {', '.join(LOADERS)}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--norms", action="store_true", help="list the effective norm of every module")
    a = p.parse_args(argv)
    loaders = tuple(x.strip() for x in a.loaders.split(",") if x.strip())
    bad = [x for x in loaders if x not in LOADERS]
    if bad:
        p.error(f"--loaders: unknown {', '.join(bad)} (choose from {', '.join(LOADERS)})")
    all_ok, dump = True, {}
    for f in a.files:
        reps = verify(Path(f), loaders)
        norms = module_norms(Path(f))
        problems = value_problems(Path(f))
        all_ok &= all(r.ok for r in reps) and not norms.non_finite and not problems
        dump[f] = {"loaders": [r.__dict__ | {"ok": r.ok} for r in reps],
                   "norms": {k: (v if math.isfinite(v) else None) for k, v in norms.norm.items()},
                   "non_finite": norms.non_finite, "problems": problems}
        if not a.json:
            print(f"{f}:")
            for prob in problems:
                print(f"  values    PROBLEM: {prob}")
            print(f"  effective norm ‖scale·up@down‖_F: {norms.summary()}")
            if norms.non_finite:
                print(f"  NON-FINITE values in {len(norms.non_finite)} module(s): {', '.join(norms.non_finite[:10])}")
            for name, v in norms.norm.items() if a.norms else ():
                print(f"      norm: {name}: {v:.6g}")
            for r in reps:
                status = "OK" if r.ok else ("REJECTED: " + r.rejected if r.rejected else "PROBLEM")
                strength = "" if r.scale_range is None else (
                    f", strength alpha/rank {r.scale_range[0]:g}" + (
                        f"-{r.scale_range[1]:g}" if r.scale_range[1] != r.scale_range[0] else ""))
                print(f"  {r.loader:9s} {status}: {len(r.used)} keys used, {len(r.dropped)} dropped{strength}")
                for k in r.dropped[:10]:
                    print(f"      dropped: {k}")
                for m, (got, want) in list(r.strength.items())[:10]:
                    print(f"      strength: {m}: applies {got:g}, the file means {want:g}")
                for n in r.notes:
                    print(f"      note: {n}")
    if a.json:
        print(json.dumps(dump, indent=1))
    return 0 if all_ok else 1


if __name__ == "__main__":
    run_main(main)
