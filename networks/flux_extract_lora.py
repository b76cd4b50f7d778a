"""Extract a FLUX LoRA from two checkpoints by SVD of their difference (kohya-compatible CLI).

For every 2-D weight of the double and single blocks, ΔW = W_tuned − W_org is approximated at rank `--dim`
(default 4) or, with `--energy E`, at the smallest rank keeping the fraction E of ‖ΔW‖² (capped by `--dim`
when given). up = U·S, down = Vᵀ, alpha = rank. `--clamp_quantile` (kohya's default 0.99) clamps factor
outliers; 1.0 disables it. Unchanged modules are skipped. The retained norm of each module is logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.errors import UserError, run_main  # noqa: E402
from library.flux.safetensors_io import check_output_path  # noqa: E402
from networks import lora_keys as K  # noqa: E402
from networks.lora_formats import LoRAWeight  # noqa: E402
from networks.lora_metadata import build_kohya_metadata  # noqa: E402
from networks.lora_svd import check_svd_args, low_rank, parse_dtype  # noqa: E402
from library.flux.safetensors_io import open_checkpoint
from networks.lora_flux import save_lora

log = logging.getLogger("flux_extract_lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_org", required=True, help="original FLUX transformer (BFL .safetensors)")
    p.add_argument("--model_tuned", required=True, help="fine-tuned FLUX transformer (BFL .safetensors)")
    p.add_argument("--save_to", required=True, help="output LoRA .safetensors")
    p.add_argument("--dim", type=int, default=None, help="rank (default 4; with --energy: the maximum rank)")
    p.add_argument("--energy", type=float, default=None, help="keep this fraction of ‖ΔW‖² per module (0-1]")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp factor outliers (1.0: off)")
    p.add_argument("--min_diff", type=float, default=0.0, help="skip modules whose max |ΔW| is not above this")
    p.add_argument("--device", default="cpu", help="device for the SVDs")
    p.add_argument("--save_precision", default=None, help="float, fp16 or bf16 (default: float)")
    p.add_argument("--mem_eff_safe_open", action="store_true", help="accepted for kohya compatibility (always lazy)")
    p.add_argument("--no_metadata", action="store_true", help="write minimal metadata")
    return p


def extract(org: Path, tuned: Path, dim: int | None, energy: float | None, clamp_quantile: float | None,
            min_diff: float = 0.0, device: str = "cpu") -> tuple[dict[str, LoRAWeight], dict[str, float]]:
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy {energy}: expected a fraction in (0, 1]")
    rank = dim if dim is not None or energy is not None else 4
    weights, retained = {}, {}
    with open_checkpoint(org) as a, open_checkpoint(tuned) as b:
        keys = [k for k in a.keys() if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight")]
        if not keys:
            raise UserError(f"{org}: no double_blocks/single_blocks weights: not a BFL FLUX transformer")
        for k in keys:
            if k not in b:
                raise UserError(f"{tuned}: missing {k} (present in {org})")
            wa = a.get(k)
            if wa.ndim != 2:
                continue
            d = b.get(k).to(device, torch.float32) - wa.to(device, torch.float32)
            if not torch.isfinite(d).all():  # SVD of NaN/inf fails deep inside LAPACK otherwise
                src = tuned if not torch.isfinite(b.get(k)).all() else org
                raise UserError(f"{src}: tensor {k!r} holds non-finite (nan/inf) values; cannot extract a LoRA")
            if float(d.abs().max()) <= min_diff:
                continue
            lr = low_rank(d, rank, energy, clamp_quantile)
            name = K.kohya_name("transformer", k[: -len(".weight")])
            weights[name] = LoRAWeight(lr.down.cpu(), lr.up.cpu(), float(lr.rank))
            retained[name] = lr.retained
    return weights, retained


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    check_svd_args(("--dim", a.dim), a.clamp_quantile)
    check_output_path(a.save_to, "--save_to", {"--model_org": a.model_org, "--model_tuned": a.model_tuned})
    weights, retained = extract(Path(a.model_org), Path(a.model_tuned), a.dim, a.energy,
                                a.clamp_quantile, a.min_diff, a.device)
    if not weights:
        raise UserError(f"{a.model_tuned}: no block weight differs from {a.model_org}: nothing to extract")
    for name, r in retained.items():
        log.info("%s: rank %d, retained norm %.4f", name, weights[name].rank, r)
    dims = sorted({w.rank for w in weights.values()})
    md = build_kohya_metadata(max(dims), float(max(dims)), None, title=Path(a.save_to).stem,
                              training={"extracted_from": f"{Path(a.model_tuned).name} - {Path(a.model_org).name}"},
                              no_metadata=a.no_metadata)
    save_lora(weights, a.save_to, parse_dtype(a.save_precision) or torch.float32, md)
    log.info("%d modules (ranks %s) → %s", len(weights), dims, a.save_to)
    return 0


if __name__ == "__main__":
    run_main(main)
