"""Generate FLUX.1 images, optionally with LoRA(s); kohya sd-scripts' flux_minimal_inference.py interface.

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \\
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a photo of sks dog" \\
        --width 1024 --height 768 --steps 28 --guidance 3.5 --seed 42 --output_dir out

--ckpt_path may also be a diffusers FLUX folder; --clip_l, --t5xxl and --ae then default to its parts.
Also kohya's --negative_prompt/--cfg_scale (true CFG), per-model dtypes and --interactive. Every PNG
carries its prompt and settings ("parameters" text as A1111/kohya write it, plus a JSON chunk).

Kontext edits / restoration: --control_image FILE (as diffusers' FluxKontextPipeline). A LoRA trained with
--flow_from_control (recorded in its metadata) starts from the control latent; --objective overrides.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from library.atomic import check_writable_folder
from library.errors import UserError, run_main
from library.flux.model_flags import FP8, component_path, compute_dtype, dtype_arg

SIZE_STEP = 16  # AE downsampling (8) x latent packing (2)
KOHYA_WIDTH, KOHYA_HEIGHT = 1360, 768  # kohya's defaults


@dataclass(frozen=True)
class InferenceArgs:
    """The parsed command line; past `parse_args` nothing sees the argparse Namespace."""

    ckpt_path: Path
    clip_l: Path
    t5xxl: Path
    ae: Path
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int | None
    guidance: float
    cfg_scale: float
    seed: int | None
    t5xxl_max_token_length: int | None
    apply_t5_attn_mask: bool
    no_shift: bool
    clip_l_dtype: str
    t5xxl_dtype: str
    flux_dtype: str  # compute dtype of the transformer
    flux_fp8: bool  # block weights stored as float8 e4m3
    ae_dtype: str
    device: str | None
    lora_weights: tuple[tuple[Path, float], ...]
    merge_lora_weights: bool
    interactive: bool
    output_dir: Path
    output_name: str | None
    control_image: Path | None = None
    control_resize: bool = True  # resize the control image to the output size (else: its own size, floored to 16)
    objective: str = "auto"  # auto (from the LoRA metadata) | noise | flow_from_control
    control_noise_std: float | None = None  # None: from the LoRA metadata
    flow_reference_tokens: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate FLUX.1 images (kohya-compatible flags).")
    g = p.add_argument_group("models (single .safetensors files or a diffusers FLUX folder)")
    g.add_argument("--ckpt_path", required=True, help="FLUX.1 transformer (flux1-dev.safetensors) or diffusers folder")
    g.add_argument("--clip_l", help="CLIP-L (clip_l.safetensors); default: the diffusers folder's text_encoder/")
    g.add_argument("--t5xxl", help="T5-XXL (t5xxl_fp16.safetensors, fp8 files too); default: text_encoder_2/")
    g.add_argument("--ae", help="autoencoder (ae.safetensors); default: the diffusers folder's vae/")
    g.add_argument("--model_type", choices=["flux"], default="flux",
                   help="kohya's flag; only FLUX.1 (dev/schnell, detected from the file) is supported, not chroma")
    g = p.add_argument_group("prompt and image")
    g.add_argument("--prompt", default="A photo of a cat")
    g.add_argument("--negative_prompt", default=None, help="used only with --cfg_scale != 1 (default: empty)")
    g.add_argument("--width", type=int, default=KOHYA_WIDTH, help="floored to a multiple of 16 (default 1360)")
    g.add_argument("--height", type=int, default=KOHYA_HEIGHT, help="floored to a multiple of 16 (default 768)")
    g.add_argument("--seed", type=int, default=None, help="default: random (written into the PNG)")
    g.add_argument("--interactive", action="store_true",
                   help="keep the models loaded and read prompts from stdin (options --w --h --s --d --g --n --c)")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="default: 50 for dev, 4 for schnell")
    g.add_argument("--guidance", type=float, default=3.5, help="embedded guidance (FLUX.1-dev; ignored by schnell)")
    g.add_argument("--cfg_scale", type=float, default=1.0,
                   help="true classifier-free guidance with --negative_prompt; 1 = off (two passes per step)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default: 512 dev, 256 schnell")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding (in T5 and the transformer)")
    g.add_argument("--no_shift", action="store_true", help="sample without FLUX's resolution-dependent shift")
    g = p.add_argument_group("Kontext edit / restoration (a control image)")
    g.add_argument("--control_image", "--control_image_path", dest="control_image", default=None, metavar="FILE",
                   help="reference image (FLUX.1 Kontext): AE-encoded and appended as reference tokens")
    g.add_argument("--control_resize", choices=["output", "none"], default="output",
                   help="output: resize the control image to --width x --height (default); none: keep its size "
                        "(floored to 16)")
    g.add_argument("--objective", choices=["auto", "noise", "flow_from_control"], default="auto",
                   help="auto: as the LoRA's metadata records (noise when none does); flow_from_control starts "
                        "sampling from the (noised) control latent")
    g.add_argument("--control_noise_std", type=float, default=None,
                   help="flow_from_control: noise std added to the control start (default: the LoRA's)")
    g.add_argument("--flow_reference_tokens", action="store_true",
                   help="with --objective flow_from_control: also use the control as reference tokens")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_weights", nargs="*", default=[], metavar="PATH[;MULT]",
                   help="LoRA file(s), each optionally with ';multiplier' (default 1.0)")
    g.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRA(s) into the weights")
    g = p.add_argument_group("precision and device (dtypes: bf16, fp16, fp32, fp8 = float8_e4m3fn)")
    g.add_argument("--dtype", type=dtype_arg, default="bfloat16", help="base dtype of every model (default bf16)")
    g.add_argument("--flux_dtype", type=dtype_arg, default=None,
                   help="transformer dtype; fp8 stores its block weights in float8 e4m3 and computes in bf16")
    g.add_argument("--clip_l_dtype", type=dtype_arg, default=None, help="CLIP-L dtype (fp8: computes in bf16)")
    g.add_argument("--t5xxl_dtype", type=dtype_arg, default=None, help="T5 dtype (fp8: computes in bf16)")
    g.add_argument("--ae_dtype", type=dtype_arg, default=None, help="AE dtype")
    g.add_argument("--fp8", action="store_true", help="same as --flux_dtype fp8")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--offload", action="store_true",
                   help="accepted for kohya compatibility: each model is already freed once it is no longer needed")
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
    if not math.isfinite(multiplier):
        raise UserError(f"--lora_weights {text!r}: multiplier {mult} must be a finite number")
    if not Path(path).is_file():
        raise UserError(f"{path}: no such LoRA file (given in --lora_weights)")
    return Path(path), multiplier


# FLUX's T5 was trained with at most 512 tokens; 16k-pixel sides and 10k steps are typos, not requests.
_LIMITS = {"steps": 10000, "width": 16384, "height": 16384, "t5xxl_max_token_length": 512}


def parse_args(argv: list[str] | None = None) -> InferenceArgs:
    a = build_parser().parse_args(argv)
    ckpt = Path(a.ckpt_path)
    if not ckpt.exists():
        raise UserError(f"{ckpt}: no such file or folder (given as --ckpt_path)")
    for name in ("steps", "width", "height", "t5xxl_max_token_length"):
        value = getattr(a, name)
        if value is not None and value < (SIZE_STEP if name in ("width", "height") else 1):
            raise UserError(f"--{name} {value}: too small")
        if value is not None and value > _LIMITS[name]:
            raise UserError(f"--{name} {value}: too large (at most {_LIMITS[name]})")
    for name in ("guidance", "cfg_scale"):
        if getattr(a, name) is not None and not math.isfinite(getattr(a, name)):
            raise UserError(f"--{name} {getattr(a, name)}: must be a finite number")
    if a.seed is not None and not -(2**63) <= a.seed < 2**64:
        raise UserError(f"--seed {a.seed}: out of range (torch seeds are 64-bit: use 0 .. 2**64-1)")
    out_dir = Path(a.output_dir)
    check_writable_folder(out_dir, f"{out_dir}: --output_dir")
    if a.control_image is not None and not Path(a.control_image).is_file():
        raise UserError(f"{a.control_image}: no such file (given as --control_image)")
    if a.control_noise_std is not None and not 0 <= a.control_noise_std < float("inf"):
        raise UserError(f"--control_noise_std {a.control_noise_std}: must be a finite number >= 0")
    flux = a.flux_dtype or a.dtype
    return InferenceArgs(
        ckpt_path=ckpt, clip_l=component_path(a.clip_l, ckpt, "--clip_l", "text_encoder"),
        t5xxl=component_path(a.t5xxl, ckpt, "--t5xxl", "text_encoder_2"), ae=component_path(a.ae, ckpt, "--ae", "vae"),
        prompt=a.prompt, negative_prompt=a.negative_prompt or "", width=a.width // SIZE_STEP * SIZE_STEP,
        height=a.height // SIZE_STEP * SIZE_STEP, steps=a.steps, guidance=a.guidance, cfg_scale=a.cfg_scale,
        seed=a.seed, t5xxl_max_token_length=a.t5xxl_max_token_length, apply_t5_attn_mask=a.apply_t5_attn_mask,
        no_shift=a.no_shift, clip_l_dtype=compute_dtype(a.clip_l_dtype or a.dtype),
        t5xxl_dtype=compute_dtype(a.t5xxl_dtype or a.dtype), flux_dtype=compute_dtype(flux), flux_fp8=a.fp8 or flux == FP8,
        ae_dtype=compute_dtype(a.ae_dtype or a.dtype), device=a.device,
        lora_weights=tuple(parse_lora_arg(x) for x in a.lora_weights), merge_lora_weights=a.merge_lora_weights,
        interactive=a.interactive, output_dir=Path(a.output_dir), output_name=a.output_name,
        control_image=Path(a.control_image) if a.control_image else None, control_resize=a.control_resize != "none",
        objective=a.objective, control_noise_std=a.control_noise_std, flow_reference_tokens=a.flow_reference_tokens)


def _output_path(args: InferenceArgs, seed: int) -> Path:
    stem = args.output_name or f"{time.strftime('%Y%m%d_%H%M%S')}_{seed}"
    path, n = args.output_dir / f"{stem}.png", 1
    while path.exists():  # never overwrite an earlier image
        path, n = args.output_dir / f"{stem}_{n}.png", n + 1
    return path


def _device(name: str | None):
    """--device as a torch.device, or a one-line error (an unknown name, CUDA asked for but absent)."""
    from library.eval.models import pick_device  # noqa: PLC0415 - keep --help fast (imports torch)

    return pick_device(name)


@dataclass
class Request:
    """One image to make: what the command line or an interactive line asks for."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int | None
    guidance: float
    cfg_scale: float
    seed: int | None


class Generator:
    """The loaded models. Without --interactive, each model is freed as soon as it is no longer needed
    (text encoders after encoding, the transformer after sampling), so they need not fit in memory together."""

    def __init__(self, args: InferenceArgs):
        import torch  # noqa: PLC0415 - keep --help fast

        from library.flux.text_encoders import FluxTextEncoders, load_clip_l, load_t5xxl

        from library.flux.loading import load_autoencoder, load_transformer  # noqa: PLC0415

        self.args, self.torch = args, torch
        self.device = _device(args.device)
        from networks.lora_formats import read_lora  # noqa: PLC0415

        for path, _ in args.lora_weights:  # a hostile or nan LoRA: one line now, before the models load
            read_lora(path)
        from library.objective import resolve_objective  # noqa: PLC0415

        self.objective = resolve_objective(args.objective, [p for p, _ in args.lora_weights], args.control_noise_std,
                                           args.flow_reference_tokens)
        if self.objective.from_control and not args.control_image:
            raise UserError("the LoRA was trained with --flow_from_control (sampling starts from the control "
                            "image): give --control_image FILE, or --objective noise to sample from noise")
        from library.sampling import open_control_image  # noqa: PLC0415

        self.control = open_control_image(args.control_image) if args.control_image else None
        # Header-only checks first (meta device, nothing read): a wrong --ckpt_path or --ae fails in
        # milliseconds, not after the text encoders are loaded and every step is sampled.
        meta = load_transformer(args.ckpt_path, "meta", getattr(torch, args.flux_dtype))
        load_autoencoder(args.ae, "meta", getattr(torch, args.ae_dtype))
        self.text_encoders = FluxTextEncoders(load_clip_l(args.clip_l, self.device, getattr(torch, args.clip_l_dtype)),
                                              load_t5xxl(args.t5xxl, self.device, getattr(torch, args.t5xxl_dtype)))
        # A LoRA may patch CLIP-L too, so with LoRAs (or --interactive) the transformer comes first.
        self.transformer = self._load_transformer() if args.lora_weights or args.interactive else None
        if args.lora_weights:
            from networks.lora_flux import apply_lora_weights  # noqa: PLC0415 - optional

            apply_lora_weights(self.transformer, self.text_encoders.clip, list(args.lora_weights),
                               args.merge_lora_weights, t5=self.text_encoders.t5)
        self.dev = bool(meta.params.guidance_embed)
        # A control image is encoded before sampling, so the AE stays loaded from then on (it is small).
        self.ae = self._load_ae() if args.interactive or args.control_image else None

    def _load_transformer(self):
        from library.flux.loading import load_transformer  # noqa: PLC0415

        a = self.args
        return load_transformer(a.ckpt_path, self.device, getattr(self.torch, a.flux_dtype), fp8=a.flux_fp8)

    def _load_ae(self):
        from library.flux.loading import load_autoencoder  # noqa: PLC0415

        return load_autoencoder(self.args.ae, self.device, getattr(self.torch, self.args.ae_dtype))

    def __call__(self, req: Request) -> Path:
        from library.sampling import (encode_control, encode_prompts, generate_latents, latents_to_pil,  # noqa
                                      sample_settings, save_png)

        a, keep = self.args, self.args.interactive
        seed = req.seed if req.seed is not None else random.randrange(2**32)
        s = sample_settings(self.dev, req.prompt, req.width, req.height, req.steps or (50 if self.dev else 4),
                            req.guidance, seed, shift=False if a.no_shift else None,
                            t5_max_length=a.t5xxl_max_token_length, apply_t5_attn_mask=a.apply_t5_attn_mask,
                            negative_prompt=req.negative_prompt, cfg_scale=req.cfg_scale,
                            control_image=a.control_image.name if a.control_image else "", objective=self.objective)
        cond, neg = encode_prompts(self.text_encoders, s)
        if not keep:
            self.text_encoders = None
        control = None
        if a.control_image:
            try:
                control = encode_control(self.ae, self.control, s.width, s.height, a.control_resize)
            except ValueError as err:
                raise UserError(f"{a.control_image}: {err} (given as --control_image)") from None
            if self.objective.from_control and control.shape[-2:] != (s.height // 8, s.width // 8):
                raise UserError(f"{a.control_image}: a flow_from_control LoRA starts from the control, so it must "
                                "have the output size: drop --control_resize none")
        transformer = self.transformer if self.transformer is not None else self._load_transformer()
        latents = generate_latents(transformer, cond, s, self.dev, neg_cond=neg, control=control)
        if not keep:
            self.transformer = transformer = None
        ae = self.ae if self.ae is not None else self._load_ae()
        image = latents_to_pil(ae, latents)[0]
        extra = {"model": a.ckpt_path.name, "model_type": "dev" if self.dev else "schnell", "dtype": a.flux_dtype,
                 "fp8": a.flux_fp8, "lora_weights": [[str(p), m] for p, m in a.lora_weights],
                 "merge_lora_weights": a.merge_lora_weights}
        return save_png(image, _output_path(a, seed), s, extra)


def parse_interactive_line(line: str, last: Request) -> Request:
    """kohya's interactive syntax: 'prompt --w 1024 --h 768 --s 28 --d 42 --g 3.5 --n negative --c 1.0'."""
    prompt, *options = line.split(" --")
    req = Request(**{**last.__dict__, "prompt": prompt.strip(), "seed": None})
    fields = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "d": ("seed", int),
              "g": ("guidance", float), "c": ("cfg_scale", float), "n": ("negative_prompt", str)}
    for opt in options:
        key, _, value = opt.strip().partition(" ")
        if key not in fields:
            raise UserError(f"unknown option --{key} (use --w --h --s --d --g --n --c)")
        name, kind = fields[key]
        try:
            setattr(req, name, kind(value.strip()) if key != "n" or value.strip() != "-" else "")
        except ValueError:
            raise UserError(f"--{key} {value.strip()!r}: not {'an integer' if kind is int else 'a number'}") from None
    from library.sampling import check_sample_values  # noqa: PLC0415 - torch is loaded by now

    check_sample_values("prompt line", req.width, req.height, req.steps, req.guidance, req.cfg_scale, req.seed)
    req.width, req.height = req.width // SIZE_STEP * SIZE_STEP, req.height // SIZE_STEP * SIZE_STEP
    return req


def interactive(gen: Generator, first: Request) -> None:
    print("Enter a prompt (empty line to exit). Options: --w W --h H --s STEPS --d SEED --g GUIDANCE "
          "--n NEGATIVE ('-' for none) --c CFG_SCALE")
    last = first
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            line = ""
        if not line:
            return
        try:
            last = parse_interactive_line(line, last)
        except UserError as err:
            print(f"error: {err}")
            continue
        print(f"saved {gen(last)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    first = Request(args.prompt, args.negative_prompt, args.width, args.height, args.steps, args.guidance,
                    args.cfg_scale, args.seed)
    gen = Generator(args)
    if args.interactive:
        interactive(gen, first)
    else:
        print(f"saved {gen(first)}")
    return 0


if __name__ == "__main__":
    run_main(main)
