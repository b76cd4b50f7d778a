"""Generate FLUX.1 images, optionally with LoRA(s); kohya sd-scripts' flux_minimal_inference.py interface.

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \\
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a photo of sks dog" \\
        --width 1024 --height 768 --steps 28 --guidance 3.5 --seed 42 --output_dir out

--ckpt_path may also be a diffusers FLUX folder; --clip_l, --t5xxl and --ae then default to its parts.
Every PNG carries its prompt and settings ("parameters" text as A1111/kohya write it, plus a JSON chunk).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError, run_main

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}
SIZE_STEP = 16  # AE downsampling (8) x latent packing (2)


@dataclass(frozen=True)
class InferenceArgs:
    """The parsed command line; past `parse_args` nothing sees the argparse Namespace."""

    ckpt_path: Path
    clip_l: Path
    t5xxl: Path
    ae: Path
    prompt: str
    width: int
    height: int
    steps: int | None
    guidance: float
    seed: int | None
    t5xxl_max_token_length: int | None
    apply_t5_attn_mask: bool
    no_shift: bool
    dtype: str
    ae_dtype: str | None
    device: str | None
    fp8: bool
    lora_weights: tuple[tuple[Path, float], ...]
    merge_lora_weights: bool
    output_dir: Path
    output_name: str | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate FLUX.1 images (kohya-compatible flags).")
    g = p.add_argument_group("models (single .safetensors files or a diffusers FLUX folder)")
    g.add_argument("--ckpt_path", required=True, help="FLUX.1 transformer (flux1-dev.safetensors) or diffusers folder")
    g.add_argument("--clip_l", help="CLIP-L (clip_l.safetensors); default: the diffusers folder's text_encoder/")
    g.add_argument("--t5xxl", help="T5-XXL (t5xxl_fp16.safetensors, fp8 files too); default: text_encoder_2/")
    g.add_argument("--ae", help="autoencoder (ae.safetensors); default: the diffusers folder's vae/")
    g = p.add_argument_group("prompt and image")
    g.add_argument("--prompt", default="A photo of a cat")
    g.add_argument("--width", type=int, default=1024, help="floored to a multiple of 16")
    g.add_argument("--height", type=int, default=1024, help="floored to a multiple of 16")
    g.add_argument("--seed", type=int, default=None, help="default: random (written into the PNG)")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="default: 50 for dev, 4 for schnell")
    g.add_argument("--guidance", type=float, default=3.5, help="embedded guidance (FLUX.1-dev; ignored by schnell)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default: 512 dev, 256 schnell")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding (in T5 and the transformer)")
    g.add_argument("--no_shift", action="store_true", help="sample without FLUX's resolution-dependent shift")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_weights", nargs="*", default=[], metavar="PATH[;MULT]",
                   help="LoRA file(s), each optionally with ';multiplier' (default 1.0)")
    g.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRA(s) into the weights")
    g = p.add_argument_group("precision and device")
    g.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype")
    g.add_argument("--ae_dtype", default=None, choices=sorted(DTYPES), help="AE dtype (default: --dtype)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--fp8", action="store_true", help="store the transformer's block weights as float8 e4m3")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=".", help="folder for the PNG (created if missing)")
    g.add_argument("--output_name", default=None, help="file name stem (default: timestamp_seed)")
    return p


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """'path' or 'path;multiplier' (kohya's syntax) -> (path, multiplier)."""
    path, _, mult = text.partition(";")
    try:
        multiplier = float(mult) if mult.strip() else 1.0
    except ValueError:
        raise UserError(f"--lora_weights {text!r}: multiplier {mult!r} is not a number (use PATH;0.8)") from None
    if not Path(path).is_file():
        raise UserError(f"{path}: no such LoRA file (given in --lora_weights)")
    return Path(path), multiplier


def _component(explicit: str | None, ckpt: Path, flag: str, subfolder: str) -> Path:
    if explicit:
        return Path(explicit)
    if ckpt.is_dir() and (ckpt / subfolder).is_dir():
        return ckpt
    raise UserError(f"{flag} is required unless --ckpt_path is a diffusers FLUX folder with {subfolder}/ "
                    f"({ckpt} is not)")


def parse_args(argv: list[str] | None = None) -> InferenceArgs:
    a = build_parser().parse_args(argv)
    ckpt = Path(a.ckpt_path)
    if not ckpt.exists():
        raise UserError(f"{ckpt}: no such file or folder (given as --ckpt_path)")
    for name in ("steps", "width", "height", "t5xxl_max_token_length"):
        value = getattr(a, name)
        if value is not None and value < (SIZE_STEP if name in ("width", "height") else 1):
            raise UserError(f"--{name} {value}: too small")
    return InferenceArgs(
        ckpt_path=ckpt, clip_l=_component(a.clip_l, ckpt, "--clip_l", "text_encoder"),
        t5xxl=_component(a.t5xxl, ckpt, "--t5xxl", "text_encoder_2"), ae=_component(a.ae, ckpt, "--ae", "vae"),
        prompt=a.prompt, width=a.width // SIZE_STEP * SIZE_STEP, height=a.height // SIZE_STEP * SIZE_STEP,
        steps=a.steps, guidance=a.guidance, seed=a.seed, t5xxl_max_token_length=a.t5xxl_max_token_length,
        apply_t5_attn_mask=a.apply_t5_attn_mask, no_shift=a.no_shift, dtype=DTYPES[a.dtype],
        ae_dtype=DTYPES[a.ae_dtype] if a.ae_dtype else None, device=a.device, fp8=a.fp8,
        lora_weights=tuple(parse_lora_arg(x) for x in a.lora_weights), merge_lora_weights=a.merge_lora_weights,
        output_dir=Path(a.output_dir), output_name=a.output_name)


def _output_path(args: InferenceArgs, seed: int) -> Path:
    stem = args.output_name or f"{time.strftime('%Y%m%d_%H%M%S')}_{seed}"
    path, n = args.output_dir / f"{stem}.png", 1
    while path.exists():  # never overwrite an earlier image
        path, n = args.output_dir / f"{stem}_{n}.png", n + 1
    return path


def _is_dev(ckpt_path: Path) -> bool:
    """Whether the transformer has FLUX.1-dev's guidance embedding, read from the safetensors header(s)."""
    from library.flux.safetensors_io import Checkpoint, shard_files  # noqa: PLC0415

    files = [ckpt_path]
    if ckpt_path.is_dir():
        folder = ckpt_path / "transformer" if (ckpt_path / "transformer").is_dir() else ckpt_path
        files = shard_files(folder, "diffusion_pytorch_model") or []
        if not files:
            raise UserError(f"{ckpt_path}: folder has no transformer/diffusion_pytorch_model.safetensors "
                            "(or sharded index); pass the FLUX file or a diffusers FLUX folder as --ckpt_path")
    keys = Checkpoint(files).keys()
    return any(k.endswith(("guidance_in.in_layer.weight", "guidance_embedder.linear_1.weight")) for k in keys)


def generate(args: InferenceArgs) -> Path:
    import torch  # noqa: PLC0415 - keep --help fast

    from library.flux.loading import load_autoencoder, load_transformer
    from library.flux.text_encoders import FluxTextEncoders, default_t5_max_length
    from library.sampling import generate_latents, latents_to_pil, sample_settings, save_png

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    # Text encoders first and freed after encoding, so T5 and the transformer need not fit together;
    # a LoRA may also patch CLIP-L, so with LoRAs the transformer is loaded before encoding.
    text_encoders = FluxTextEncoders.load(args.clip_l, args.t5xxl, device, dtype)
    transformer = load_transformer(args.ckpt_path, device, dtype, fp8=args.fp8) if args.lora_weights else None
    if args.lora_weights:
        from networks.lora_flux import apply_lora_weights  # noqa: PLC0415 - optional

        apply_lora_weights(transformer, text_encoders.clip, list(args.lora_weights), args.merge_lora_weights)
    dev = _is_dev(args.ckpt_path) if transformer is None else bool(transformer.params.guidance_embed)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    settings = sample_settings(dev, args.prompt, args.width, args.height, args.steps or (50 if dev else 4),
                               args.guidance, seed, shift=False if args.no_shift else None,
                               t5_max_length=args.t5xxl_max_token_length or default_t5_max_length(dev),
                               apply_t5_attn_mask=args.apply_t5_attn_mask)
    with torch.no_grad():
        cond = text_encoders.encode([settings.prompt], settings.t5_max_length, settings.apply_t5_attn_mask)
    del text_encoders
    if transformer is None:
        transformer = load_transformer(args.ckpt_path, device, dtype, fp8=args.fp8)
    latents = generate_latents(transformer, cond, settings, dev)
    del transformer
    ae = load_autoencoder(args.ae, device, getattr(torch, args.ae_dtype or args.dtype))
    image = latents_to_pil(ae, latents)[0]
    extra = {"model": args.ckpt_path.name, "model_type": "dev" if dev else "schnell", "dtype": args.dtype,
             "lora_weights": [[str(p), m] for p, m in args.lora_weights], "merge_lora_weights": args.merge_lora_weights}
    return save_png(image, _output_path(args, seed), settings, extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = generate(args)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
