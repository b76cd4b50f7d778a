"""Convert a FLUX LoRA between formats (kohya sd-scripts ↔ diffusers/PEFT/ai-toolkit, ComfyUI; from XLabs).

kohya-compatible arguments: `--src {sd-scripts,ai-toolkit,...} --dst {...} --src_path --dst_path`. The source
format is detected from the keys (`--src` is checked against it); the source metadata is copied. Keys no
module is known for are an error (`--drop_unknown` converts the rest and lists them).

    python networks/convert_flux_lora.py --src_path in.safetensors --dst_path out.safetensors --dst diffusers
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, run_main  # noqa: E402
from library.flux.safetensors_io import check_output_path  # noqa: E402
from networks.lora_formats import WRITERS, load_lora_file, parse_lora, to_diffusers  # noqa: E402
from networks.lora_svd import parse_dtype  # noqa: E402
from library.flux.safetensors_io import save_file_atomic

log = logging.getLogger("convert_flux_lora")
SRC_STYLES = {"sd-scripts": {"kohya"}, "kohya": {"kohya"}, "ai-toolkit": {"diffusers"}, "diffusers": {"diffusers"},
              "peft": {"diffusers"}, "comfyui": {"comfyui", "kohya"}, "xlabs": {"xlabs"}, "auto": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default="auto", choices=sorted(SRC_STYLES), help="source format (default: detect)")
    p.add_argument("--dst", default="sd-scripts", choices=sorted(WRITERS), help="destination format")
    p.add_argument("--src_path", required=True, help="source LoRA .safetensors")
    p.add_argument("--dst_path", required=True, help="destination .safetensors (written atomically)")
    p.add_argument("--save_precision", default=None, help="float, fp16 or bf16 (default: keep)")
    p.add_argument("--diffusers_alpha", action="store_true",
                   help="diffusers output: write .alpha keys instead of baking alpha/rank into lora_B "
                        "(exact weights; InvokeAI then rejects the file)")
    p.add_argument("--drop_unknown", action="store_true", help="convert even if some keys are not understood")
    return p


def convert(src_path: Path, dst_path: Path, dst: str, src: str = "auto", dtype=None, diffusers_alpha: bool = False,
            drop_unknown: bool = False) -> dict:
    sd, meta = load_lora_file(src_path)
    parsed = parse_lora(sd, meta, source=str(src_path))
    if not parsed.weights:
        raise UserError(f"{src_path}: no LoRA modules found (first keys: {', '.join(sorted(sd)[:3])})")
    want = SRC_STYLES[src]
    if want is not None and not parsed.formats <= want:
        raise UserError(f"{src_path}: --src {src} but the keys are in {', '.join(sorted(parsed.formats))} format")
    if parsed.unknown:
        msg = f"{src_path}: {len(parsed.unknown)} keys not understood: {', '.join(parsed.unknown[:6])}"
        if not drop_unknown:
            raise UserError(msg + " (use --drop_unknown to convert the rest)")
        log.warning(msg + " - dropped")
    if dst in ("diffusers", "ai-toolkit", "peft"):
        out = to_diffusers(parsed.weights, dtype, alpha_keys=diffusers_alpha)
    else:
        out = WRITERS[dst](parsed.weights, dtype)
    meta = {k: v for k, v in meta.items() if k != "lora_adapter_metadata"}  # alpha now lives in the tensors
    save_file_atomic(out, dst_path, meta)
    return {"modules": len(parsed.weights), "from": sorted(parsed.formats), "dropped": parsed.unknown}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    check_output_path(a.dst_path, "--dst_path", {"--src_path": a.src_path})
    info = convert(Path(a.src_path), Path(a.dst_path), a.dst, a.src, parse_dtype(a.save_precision),
                   a.diffusers_alpha, a.drop_unknown)
    log.info("%s: %d modules (%s) → %s (%s)", a.src_path, info["modules"], ", ".join(info["from"]), a.dst_path, a.dst)
    return 0


if __name__ == "__main__":
    run_main(main)
