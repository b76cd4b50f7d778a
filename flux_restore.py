"""Restore a folder of images with a FLUX.1 Kontext restoration LoRA, and measure how much it restored.

    python flux_restore.py --ckpt_path flux1-kontext-dev.safetensors --clip_l clip_l.safetensors \\
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --lora_weights restore.safetensors \\
        --input_dir degraded/ --reference_dir clean/ --output_dir restored/

One PNG per input (settings in its metadata; a rerun skips the images already done). With --reference_dir
(the clean originals, matched by file stem): PSNR and SSIM of the input and of the restored image per image
and in total in metrics.csv, and gallery.html / gallery.png side by side. With --degrade CONFIG the inputs
are clean photos: each is degraded first (the [degradation] table of a dataset TOML) and is its own
reference. The LoRA's training objective (metadata) decides where sampling starts; see docs/inference.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.atomic import check_writable_folder
from library.errors import UserError, run_main
from library.flux.model_flags import component_path, compute_dtype, dtype_arg

DEFAULT_PROMPT = "Restore this photo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Restore a folder of images with a FLUX.1 Kontext LoRA.")
    g = p.add_argument_group("models (as flux_minimal_inference.py)")
    g.add_argument("--ckpt_path", required=True, help="FLUX.1 (Kontext) transformer or a diffusers folder")
    g.add_argument("--clip_l", help="CLIP-L; default: the diffusers folder's text_encoder/")
    g.add_argument("--t5xxl", help="T5-XXL; default: the diffusers folder's text_encoder_2/")
    g.add_argument("--ae", help="autoencoder; default: the diffusers folder's vae/")
    g.add_argument("--lora_weights", nargs="*", default=[], metavar="PATH[;MULT]", help="restoration LoRA(s)")
    g.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRA(s) into the weights")
    g = p.add_argument_group("images")
    g.add_argument("--input_dir", required=True, help="images to restore (clean ones with --degrade)")
    g.add_argument("--output_dir", required=True, help="restored PNGs, metrics.csv, gallery.html/png")
    g.add_argument("--reference_dir", default=None, help="clean originals (same file stems): PSNR/SSIM + gallery")
    g.add_argument("--degrade", default=None, metavar="CONFIG",
                   help="a TOML with a [degradation] table: degrade the (clean) inputs first, then restore them")
    g.add_argument("--width", type=int, default=None, help="output width (default: the input's, floored to 16)")
    g.add_argument("--height", type=int, default=None, help="output height (default: the input's)")
    g.add_argument("--gallery_rows", type=int, default=16, help="images in gallery.png (default 16)")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the instruction (default {DEFAULT_PROMPT!r}; use "
                                                             "the caption the LoRA was trained with)")
    g.add_argument("--steps", type=int, default=None, help="default: 28 for dev, 4 for schnell")
    g.add_argument("--guidance", type=float, default=2.5, help="embedded guidance (default 2.5, Kontext's)")
    g.add_argument("--seed", type=int, default=0, help="the same seed for every image (default 0)")
    g.add_argument("--batch_size", type=int, default=1, help="images per batch (same-size images are batched)")
    g.add_argument("--no_shift", action="store_true", help="sample without FLUX's resolution-dependent shift")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default: 512 dev, 256 schnell")
    g.add_argument("--objective", choices=["auto", "noise", "flow_from_control"], default="auto",
                   help="auto: as the LoRA's metadata records")
    g.add_argument("--control_noise_std", type=float, default=None, help="flow_from_control start noise")
    g.add_argument("--flow_reference_tokens", action="store_true",
                   help="with --objective flow_from_control: also use reference tokens")
    g = p.add_argument_group("precision and device")
    g.add_argument("--dtype", default="bfloat16", help="model dtype (bf16, fp16, fp32; default bf16)")
    g.add_argument("--fp8", action="store_true", help="transformer block weights stored as float8 e4m3")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def parse_args(argv: list[str] | None):
    """The command line -> RestoreArgs (checked: folders, files, ranges), or a one-line UserError."""
    import flux_minimal_inference as fmi  # noqa: PLC0415 - the shared model flags' checks

    a = build_parser().parse_args(argv)
    ckpt = Path(a.ckpt_path)
    if not ckpt.exists():
        raise UserError(f"{ckpt}: no such file or folder (given as --ckpt_path)")
    for flag in ("input_dir", "reference_dir"):
        value = getattr(a, flag)
        if value is not None and not Path(value).is_dir():
            raise UserError(f"{value}: no such folder (given as --{flag})")
    out = Path(a.output_dir).resolve()
    for flag in ("input_dir", "reference_dir"):  # outputs are <stem>.png: they could replace the user's images
        value = getattr(a, flag)
        if value is not None and Path(value).resolve() == out:
            raise UserError(f"{a.output_dir}: --output_dir is the --{flag}; restored PNGs would replace your "
                            "images there: use another folder")
    if a.degrade is not None and not Path(a.degrade).is_file():
        raise UserError(f"{a.degrade}: no such file (given as --degrade)")
    for flag in ("batch_size", "steps", "gallery_rows"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: must be at least 1")
    for flag in ("width", "height"):
        value = getattr(a, flag)
        if value is not None and not 16 <= value <= 8192:
            raise UserError(f"--{flag} {value}: must be in 16..8192")
    if a.control_noise_std is not None and not 0 <= a.control_noise_std < float("inf"):
        raise UserError(f"--control_noise_std {a.control_noise_std}: must be a finite number >= 0")
    try:
        dtype = compute_dtype(dtype_arg(a.dtype))
    except argparse.ArgumentTypeError as err:
        raise UserError(f"--dtype: {err}") from None
    check_writable_folder(Path(a.output_dir), f"{Path(a.output_dir)}: --output_dir")
    a.clip_l = component_path(a.clip_l, ckpt, "--clip_l", "text_encoder")
    a.t5xxl = component_path(a.t5xxl, ckpt, "--t5xxl", "text_encoder_2")
    a.ae = component_path(a.ae, ckpt, "--ae", "vae")
    from library.eval.models import pick_device  # noqa: PLC0415 - keep --help fast (imports torch)
    from library.restore.tool import RestoreArgs  # noqa: PLC0415

    return RestoreArgs(
        ckpt_path=ckpt, clip_l=Path(a.clip_l), t5xxl=Path(a.t5xxl), ae=Path(a.ae),
        lora_weights=tuple(fmi.parse_lora_arg(x) for x in a.lora_weights), merge_lora_weights=a.merge_lora_weights,
        input_dir=Path(a.input_dir), output_dir=Path(a.output_dir),
        reference_dir=Path(a.reference_dir) if a.reference_dir else None,
        degrade=Path(a.degrade) if a.degrade else None, width=a.width, height=a.height, gallery_rows=a.gallery_rows,
        prompt=a.prompt, steps=a.steps, guidance=a.guidance, seed=a.seed, batch_size=a.batch_size,
        no_shift=a.no_shift, t5xxl_max_token_length=a.t5xxl_max_token_length, objective=a.objective,
        control_noise_std=a.control_noise_std, flow_reference_tokens=a.flow_reference_tokens, dtype=dtype,
        fp8=a.fp8, device=pick_device(a.device))


def main(argv: list[str] | None = None) -> int:
    from library.restore.tool import restore_command  # noqa: PLC0415

    print(restore_command(parse_args(argv)))
    return 0


if __name__ == "__main__":
    run_main(main)
