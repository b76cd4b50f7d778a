"""Merge FLUX LoRAs into a base checkpoint, or combine several LoRAs into one (kohya-compatible CLI).

Into a base (`--flux_model`): W += ratio · alpha/rank · up @ down for every module of every `--models` file
(any supported LoRA format), in float32, and the result is written as a BFL single file in
`--save_precision` (float / fp16 / bf16 / fp8: e4m3 for the block Linear weights, bf16 for the rest).
`--clip_l` / `--t5xxl` with `--clip_l_save_to` / `--t5xxl_save_to` merge the text-encoder parts.

Without `--flux_model`, the LoRAs are combined into one LoRA (`--save_to`): by default exactly, by
concatenating the ranks (`--concat`; the up blocks carry ratio · alpha/rank so the file's alpha = rank), or
by SVD of the summed ΔW to `--new_rank`, with the retained energy ‖ΔW_r‖²/‖ΔW‖² reported per module
(`--energy_report` writes it as JSON). `--ratios` may be negative: `--models a b --ratios 1 -1` is a − b,
`--ratios 0.5 0.5` the average (networks/lora_algebra.py). (kohya's default sums downs and ups separately,
which is not the sum of the updates; this tool never does that.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.atomic import write_text_atomic  # noqa: E402
from library.errors import UserError, run_main  # noqa: E402
from library.flux.model import to_fp8  # noqa: E402
from library.flux.safetensors_io import (check_output_path, open_checkpoint, read_metadata,  # noqa: E402
                                         save_file_atomic)
from networks import lora_algebra as A  # noqa: E402
from networks import lora_keys as K  # noqa: E402
from networks.lora_checks import check_combinable, check_finite, check_numbers  # noqa: E402
from networks.lora_flux import save_lora  # noqa: E402
from networks.lora_formats import LoRAWeight, read_lora  # noqa: E402
from networks.lora_metadata import NETWORK_MODULE, modelspec  # noqa: E402
from networks.lora_svd import check_svd_args, parse_dtype  # noqa: E402

log = logging.getLogger("flux_merge_lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flux_model", default=None, help="base FLUX transformer (BFL .safetensors)")
    p.add_argument("--clip_l", default=None, help="CLIP-L .safetensors to merge lora_te1_ modules into")
    p.add_argument("--t5xxl", default=None, help="T5-XXL .safetensors to merge lora_te3_ modules into")
    p.add_argument("--save_to", required=True, help="output transformer (or combined LoRA) .safetensors")
    p.add_argument("--clip_l_save_to", default=None, help="output CLIP-L .safetensors (with --clip_l)")
    p.add_argument("--t5xxl_save_to", default=None, help="output T5-XXL .safetensors (with --t5xxl)")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files")
    p.add_argument("--ratios", nargs="*", type=float, default=None, help="one multiplier per LoRA (default 1)")
    p.add_argument("--save_precision", default=None, help="float, fp16, bf16 or fp8 (default: the input's)")
    p.add_argument("--precision", default="float", help="working precision (only float is used)")
    p.add_argument("--loading_device", default="cpu",
                   help="accepted for kohya compatibility (tensors stream from disk)")
    p.add_argument("--working_device", default="cpu", help="device for the merge arithmetic (cpu or cuda)")
    p.add_argument("--mem_eff_load_save", action="store_true", help="accepted for kohya compatibility (always lazy)")
    p.add_argument("--concat", action="store_true", help="combine by concatenating ranks (exact; the default)")
    p.add_argument("--new_rank", type=int, default=None, help="combine by SVD of the summed update to this rank")
    p.add_argument("--energy_report", default=None,
                   help="with --new_rank: write the retained energy per module (JSON) to this file")
    p.add_argument("--shuffle", action="store_true", help="permute the rank order of the combined LoRA (as kohya)")
    p.add_argument("--no_metadata", action="store_true", help="write minimal metadata")
    p.add_argument("--diffusers", action="store_true", help="accepted: diffusers-layout bases are detected")
    return p


def _ratios(models: list[str], ratios: list[float] | None) -> list[float]:
    if not ratios:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"--ratios: {len(ratios)} values for {len(models)} --models")
    return ratios


def deltas_by_component(files: list[tuple[Path, float]], device: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"transformer"|"te1"|"te3": {module path: Σ ratio·ΔW}} over all files (fp32)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, ratio in files:
        parsed = read_lora(path)
        if parsed.unknown:
            log.warning("%s: %d keys not understood, not merged: %s", path, len(parsed.unknown),
                        ", ".join(parsed.unknown[:5]))
        for name, w in parsed.weights.items():
            comp, mpath = K.split_kohya_name(name)
            d = LoRAWeight(w.down.to(device), w.up.to(device), w.alpha).delta() * ratio
            slot = out.setdefault(comp, {})
            slot[mpath] = slot[mpath] + d if mpath in slot else d
    return out


def _find_key(keys: set[str], module_path: str) -> str | None:
    """The checkpoint key of a module's weight, allowing a prefix (e.g. `text_model.`, `clip_l.transformer.`)."""
    want = module_path + ".weight"
    hits = [k for k in keys if k == want or k.endswith("." + want)]
    if not hits and module_path.startswith("text_model."):  # transformers 5 CLIP files drop `text_model.`
        return _find_key(keys, module_path[len("text_model."):])
    return min(hits, key=len) if hits else None


def merge_into_file(base: Path, out: Path, deltas: dict[str, torch.Tensor], dtype: torch.dtype | None,
                    what: str, device: str = "cpu") -> int:
    """Stream `base`, add each delta to its weight, write `out` (BFL names kept). Returns modules merged."""
    with open_checkpoint(Path(base)) as ckpt:
        keys = set(ckpt.keys())
        where = {}
        for mpath, d in deltas.items():
            k = _find_key(keys, mpath)
            if k is None:
                raise UserError(f"{base}: no weight for LoRA module {mpath} ({what}); is this the right model?")
            where[k] = d
        sd = {}
        for k in sorted(keys):
            t = ckpt.get(k)
            if k in where:
                if tuple(t.shape) != tuple(where[k].shape):
                    raise UserError(f"{base}: {k}: shape {list(t.shape)} but the LoRA's ΔW is {list(where[k].shape)}")
                t = (t.to(device, torch.float32) + where[k]).to(t.dtype if dtype is None else torch.float32)
                check_finite({k: t}, str(base), "after the merge, ")  # a NaN base or an overflow: never written
            if dtype == torch.float8_e4m3fn:
                fp8 = t.ndim == 2 and k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight")
                t = to_fp8(t.float()) if fp8 else t.to(torch.bfloat16)
            elif dtype is not None:
                t = t.to(dtype)
            sd[k] = t.cpu().contiguous()
    save_file_atomic(sd, out, read_metadata(base) or None)
    return len(where)


def combine(files: list[tuple[Path, float]], new_rank: int | None, shuffle: bool = False
            ) -> tuple[dict[str, LoRAWeight], dict[str, float]]:
    """One LoRA whose ΔW is Σ ratio·ΔW_i: concatenated ranks (exact) or SVD to `new_rank`.
    Returns the weights and, for SVD, the retained energy ‖ΔW_r‖²/‖ΔW‖² per module."""
    result = A.combine(A.read_terms(files), new_rank, shuffle)
    return result.weights, result.energy


def check_merge_args(a: argparse.Namespace, files: list[tuple[Path, float]]) -> None:
    """Before anything is read at size: finite ratios, an output for every text encoder given, a working device
    that exists, and LoRAs (each finite, read_lora checks) of one model."""
    check_numbers(a.ratios, "--ratios")
    for enc in ("clip_l", "t5xxl"):
        if getattr(a, enc) and not getattr(a, f"{enc}_save_to"):
            raise UserError(f"--{enc} {getattr(a, enc)}: give --{enc}_save_to too (where the merged {enc} is written)")
    if a.working_device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--working_device {a.working_device}: CUDA is not available here; use --working_device cpu")
    check_combinable([(str(p), read_lora(p).weights) for p, _ in files])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    files = [(Path(m), r) for m, r in zip(a.models, _ratios(a.models, a.ratios))]
    check_merge_args(a, files)
    dtype = parse_dtype(a.save_precision, allow_fp8=True)
    check_svd_args(("--new_rank", a.new_rank))
    inputs = {"--flux_model": a.flux_model, "--clip_l": a.clip_l, "--t5xxl": a.t5xxl,
              **{f"--models {m}": m for m in a.models}}
    for flag in ("--save_to", "--clip_l_save_to", "--t5xxl_save_to"):
        if getattr(a, flag[2:]) is not None:
            check_output_path(getattr(a, flag[2:]), flag, inputs)
    if a.flux_model is None:
        if a.concat and a.new_rank:
            raise UserError("--concat and --new_rank: choose one way to combine")
        weights, energy = combine(files, a.new_rank, a.shuffle)
        for name, e in energy.items():
            log.info("%s: retained energy %.4f", name, e)
        log.info("%s", A.energy_summary(energy))
        if a.energy_report:
            write_text_atomic(a.energy_report, json.dumps({"new_rank": a.new_rank, "energy": energy}, indent=1))
        ranks = sorted({w.rank for w in weights.values()})
        md = {"ss_network_module": NETWORK_MODULE, "ss_base_model_version": "flux1",
              "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(ranks)),
              **modelspec(Path(a.save_to).stem, extra={"merged_from": ", ".join(a.models)})}
        save_lora(weights, a.save_to, None if dtype == torch.float8_e4m3fn else dtype, md)
        log.info("%d modules (ranks %s) → %s", len(weights), ranks, a.save_to)
        return 0
    deltas = deltas_by_component(files, a.working_device)
    n = merge_into_file(Path(a.flux_model), Path(a.save_to), deltas.get("transformer", {}), dtype, "transformer",
                        a.working_device)
    log.info("%s: merged %d modules → %s", a.flux_model, n, a.save_to)
    for comp, src, dst in (("te1", a.clip_l, a.clip_l_save_to), ("te3", a.t5xxl, a.t5xxl_save_to)):
        if comp in deltas and (src is None or dst is None):
            log.warning("%d %s modules not merged: give --%s and --%s_save_to", len(deltas[comp]), comp,
                        "clip_l" if comp == "te1" else "t5xxl", "clip_l" if comp == "te1" else "t5xxl")
        elif comp in deltas:
            n = merge_into_file(Path(src), Path(dst), deltas[comp], dtype if dtype != torch.float8_e4m3fn else
                                torch.bfloat16, comp, a.working_device)
            log.info("%s: merged %d modules → %s", src, n, dst)
    return 0


if __name__ == "__main__":
    run_main(main)
