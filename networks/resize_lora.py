"""Reduce a LoRA's rank by SVD and report how much of each module's update is kept (kohya-compatible CLI).

Each module's ΔW = alpha/rank · up @ down is re-factored at `--new_rank` (or less, with kohya's
`--dynamic_method sv_ratio|sv_fro|sv_cumulative` and `--dynamic_param`), keeping its scale (alpha is
rescaled to new_rank · alpha/rank). The retained norm ‖ΔW_r‖_F / ‖ΔW‖_F is printed per module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, run_main  # noqa: E402
from library.flux.safetensors_io import check_output_path  # noqa: E402
from networks.lora_checks import check_finite, lora_tensors  # noqa: E402
from networks.lora_formats import LoRAWeight, ParsedLoRA, load_lora_file, parse_lora  # noqa: E402
from networks.lora_svd import check_svd_args, low_rank, parse_dtype  # noqa: E402
from networks.lora_flux import save_lora

log = logging.getLogger("resize_lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="LoRA to resize (any supported format)")
    p.add_argument("--save_to", required=True, help="output .safetensors (kohya format)")
    p.add_argument("--new_rank", type=int, default=4, help="maximum rank")
    p.add_argument("--dynamic_method", default=None, choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank (<= --new_rank) from its singular values, as kohya")
    p.add_argument("--dynamic_param", type=float, default=None,
                   help="sv_ratio: keep S_i >= S_0/param (param >= 1); sv_fro / sv_cumulative: fraction in (0, 1]")
    p.add_argument("--save_precision", default=None, help="float, fp16 or bf16 (default: the input's)")
    p.add_argument("--device", default="cpu", help="device for the SVDs")
    p.add_argument("--verbose", action="store_true", help="print every module (otherwise a summary)")
    return p


def resize(parsed: ParsedLoRA, new_rank: int, method: str | None = None, param: float | None = None,
           device: str = "cpu") -> tuple[dict[str, LoRAWeight], dict[str, float]]:
    out, retained = {}, {}
    for name, w in sorted(parsed.weights.items()):
        base = (w.up.to(device).float() @ w.down.to(device).float())  # SVD of up@down; the scale is kept
        lr = low_rank(base, new_rank, method=method, param=param)
        out[name] = LoRAWeight(lr.down.cpu(), lr.up.cpu(), w.scale * lr.rank)
        retained[name] = lr.retained
    return out, retained


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    if a.dynamic_method and a.dynamic_param is None:
        raise UserError(f"--dynamic_method {a.dynamic_method} needs --dynamic_param")
    check_svd_args(("--new_rank", a.new_rank), method=a.dynamic_method, param=a.dynamic_param)
    check_output_path(a.save_to, "--save_to", {"--model": a.model})
    sd, meta = load_lora_file(a.model)
    parsed = parse_lora(sd, meta, source=str(a.model))
    if parsed.unknown:
        raise UserError(f"{a.model}: {len(parsed.unknown)} keys not understood: {', '.join(parsed.unknown[:5])}")
    if not parsed.weights:
        raise UserError(f"{a.model}: no LoRA modules found: nothing to resize")
    check_finite(lora_tensors(parsed.weights), str(a.model))  # SVD of NaN fails inside LAPACK otherwise
    dtype = parse_dtype(a.save_precision) or next(iter(parsed.weights.values())).up.dtype
    weights, retained = resize(parsed, a.new_rank, a.dynamic_method, a.dynamic_param, a.device)
    for name, r in retained.items():
        if a.verbose:
            print(f"{name}: rank {parsed.weights[name].rank} → {weights[name].rank}, retained norm {r:.4f}")
    vals = list(retained.values())
    print(f"retained norm: mean {sum(vals) / len(vals):.4f}, min {min(vals):.4f} "
          f"({min(retained, key=retained.get)})")
    meta = {**meta, "ss_network_dim": str(max(w.rank for w in weights.values())),
            "ss_network_alpha": "Dynamic" if a.dynamic_method else str(max(w.alpha for w in weights.values())),
            "ss_resize": f"{a.new_rank} {a.dynamic_method or ''} {a.dynamic_param or ''}".strip()}
    meta = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    save_lora(weights, a.save_to, dtype, meta)
    return 0


if __name__ == "__main__":
    run_main(main)
