"""FLUX.1 sampling: the shifted flow-matching schedule, seeded initial noise and the Euler sampler.

Used by flux_minimal_inference.py and by the trainer's sample images. The numbers follow diffusers'
FluxPipeline + FlowMatchEulerDiscreteScheduler and the BFL reference (`get_schedule` / `denoise`):

- schedule: t_i = linspace(1, 0, steps + 1), time-shifted t' = e^mu / (e^mu + (1/t - 1)) with mu linear in
  the image token count between (256, 0.5) and (4096, 1.15) (SD3 paper, "resolution-dependent shifting");
  FLUX.1-schnell is sampled unshifted.
- noise: unpacked latents [B, 16, 2*(H//16), 2*(W//16)] in float32 from a CPU `torch.Generator` seeded with
  the seed, then packed — what diffusers (`randn_tensor`) and ComfyUI (`prepare_noise`) draw, so a seed
  starts from the same noise in the three tools (and gives diffusers' FluxPipeline image exactly in fp32).
- mu and the time shift themselves live once, in library/flow.py (the trainer's `flux_shift` uses them too).
- Euler step x <- x + (t_next - t) * v, with the velocity v from the transformer. The running latents stay
  float32 whatever the model dtype (diffusers' scheduler also upcasts for the update).
- Kontext (an edit / restoration with a control image), as diffusers' FluxKontextPipeline: the control image is
  resized (Lanczos) to the output size, encoded by the AE (posterior mean), packed and appended to the image
  tokens at every step with position ids whose first axis is 1; the velocity of the target tokens only is used.
  A LoRA trained with --flow_from_control (library/objective.py) starts from the control latent
  (+ control_noise_std * the seed's noise) instead of from noise, and uses reference tokens only if trained so.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from library.atomic import atomic_target, write_bytes_atomic
from library.data.images import BadImageError, load_image
from library.errors import UserError
from library.flow import control_endpoint, flux_mu, time_shift
from library.flux.geometry import AE_DOWNSAMPLE, LATENT_CHANNELS, PATCH, PIXEL_MULTIPLE
from library.flux.math import make_img_ids, make_txt_ids, pack_latents, unpack_latents
from library.flux.text_encoders import FluxTextEncoders, TextEncoding, default_t5_max_length
from library.objective import Objective

PNG_JSON_KEY = "flux_sample"  # PNG text chunk holding the settings as JSON (beside A1111's "parameters")


@dataclass(frozen=True)
class SampleSettings:
    """What defines one generated image (also written into the PNG metadata)."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    shift: bool = True
    t5_max_length: int = 512
    apply_t5_attn_mask: bool = False
    negative_prompt: str = ""
    cfg_scale: float = 1.0  # true classifier-free guidance (two passes per step) only when != 1
    control_image: str = ""  # Kontext: the reference / degraded image (its file name), "" for none
    objective: str = "noise"  # where sampling starts: "noise" or "flow_from_control" (library/objective.py)
    control_noise_std: float = 0.0  # flow_from_control: noise std added to the control start
    reference_tokens: bool = True  # the control image as Kontext reference tokens

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def objective_spec(self) -> Objective:
        return Objective(self.objective, self.control_noise_std, self.reference_tokens)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """Unpacked latent (h, w) for an image size: diffusers' 2 * (size // 16); sizes are floored to 16."""
    step = AE_DOWNSAMPLE * PATCH
    return PATCH * (height // step), PATCH * (width // step)


def image_seq_len(width: int, height: int) -> int:
    """Number of packed image tokens, the quantity the FLUX shift depends on."""
    h, w = latent_size(width, height)
    return (h // PATCH) * (w // PATCH)


def get_schedule(steps: int, seq_len: int, shift: bool = True) -> torch.Tensor:
    """The steps + 1 noise levels t_0 = 1 > … > t_steps = 0 (float32) of FLUX sampling.

    Computed in float64 then rounded once, so it matches diffusers (sigmas) and BFL to float32 precision.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        head = time_shift(flux_mu(seq_len), t[:-1])  # the last level is exactly 0 (1/t would divide by zero)
        t = torch.cat([head, t[-1:]])
    return t.float()


def draw_noise(width: int, height: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Initial latents [B, 16, h, w], float32 on the CPU, drawn as diffusers and ComfyUI draw them."""
    h, w = latent_size(width, height)
    return torch.randn((batch, LATENT_CHANNELS, h, w), generator=generator, dtype=torch.float32, device="cpu")


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded like `torch.Generator().manual_seed(seed)` in diffusers' docs."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


class _Conditioning:
    """One prompt's transformer inputs, moved to the model's device and compute dtype once."""

    def __init__(self, enc: TextEncoding, device: torch.device, dtype: torch.dtype, use_mask: bool):
        self.txt = enc.t5_out.to(device=device, dtype=dtype)
        self.y = enc.clip_pooled.to(device=device, dtype=dtype)
        self.txt_ids = make_txt_ids(self.txt.shape[0], self.txt.shape[1]).to(device)
        self.mask = enc.t5_attn_mask.to(device) if use_mask else None


def control_pixels(image: Image.Image, width: int, height: int, resize: bool = True) -> torch.Tensor:
    """A control image as [1, 3, H, W] in [-1, 1]: RGB, resized with Lanczos (diffusers' VaeImageProcessor) to
    the output size, or with `resize=False` to its own size floored to a multiple of 16 (FluxKontextPipeline
    with `_auto_resize=False`)."""
    step = AE_DOWNSAMPLE * PATCH
    size = (width, height) if resize else (image.width // step * step, image.height // step * step)
    if min(size) < step:
        raise ValueError(f"control image {image.width}x{image.height} is smaller than {step} px")
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, resample=Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return x * 2.0 - 1.0


def open_control_image(path: str | os.PathLike, flag: str = "--control_image") -> Image.Image:
    """An upright 8-bit RGB PIL image (EXIF orientation applied), or a one-line error naming the file."""
    try:
        return Image.fromarray(load_image(Path(path)).rgb)
    except BadImageError as err:
        raise UserError(f"{path}: cannot read image ({err.reason}) (given as {flag})") from None


def encode_control(ae: torch.nn.Module, image: Image.Image, width: int, height: int,
                   resize: bool = True) -> torch.Tensor:
    """Scaled/shifted control latents [1, 16, h, w] (float32, the AE's posterior mean)."""
    param = next(ae.parameters())
    with torch.no_grad():
        pixels = control_pixels(image, width, height, resize).to(device=param.device, dtype=param.dtype)
        return ae.encode(pixels).float()


@torch.no_grad()
def denoise(transformer: torch.nn.Module, noise: torch.Tensor, cond: TextEncoding, timesteps: torch.Tensor,
            guidance: float | None, apply_t5_attn_mask: bool = False, progress: bool = True,
            neg_cond: TextEncoding | None = None, cfg_scale: float = 1.0,
            reference: torch.Tensor | None = None) -> torch.Tensor:
    """Euler-integrate the flow from t = 1 (noise [B, 16, h, w]) to t = 0; returns clean latents, float32.

    The start is whatever `noise` holds (the (noised) control latent for --flow_from_control LoRAs).
    `reference` [B, 16, h', w'] (Kontext) is appended as clean image tokens with first position axis 1.

    `guidance` is the embedded guidance of FLUX.1-dev (None for schnell). With `neg_cond`, each step also
    predicts the negative prompt's velocity and uses v_neg + cfg_scale * (v - v_neg) (true CFG, as kohya's
    --cfg_scale and diffusers' true_cfg_scale). `apply_t5_attn_mask` hands T5's padding mask to the
    transformer (kohya's --apply_t5_attn_mask).
    """
    param = next(transformer.parameters())
    device, dtype = param.device, cond.t5_out.dtype if param.dtype == torch.float8_e4m3fn else param.dtype
    batch, _, h, w = noise.shape
    x = pack_latents(noise.to(device=device, dtype=torch.float32))
    img_ids = make_img_ids(batch, h // PATCH, w // PATCH).to(device)
    conds = [_Conditioning(c, device, dtype, apply_t5_attn_mask) for c in (cond, neg_cond) if c is not None]
    g = None if guidance is None else torch.full((batch,), float(guidance), device=device, dtype=dtype)
    kontext = {}  # reference tokens, passed only when there are any
    if reference is not None:
        kontext = {"cond": pack_latents(reference.to(device=device, dtype=torch.float32)).to(dtype),
                   "cond_ids": make_img_ids(batch, reference.shape[-2] // PATCH, reference.shape[-1] // PATCH,
                                            index=1).to(device)}
    ts = timesteps.tolist()
    for t_curr, t_next in tqdm(list(zip(ts[:-1], ts[1:])), desc="sampling", disable=not progress, leave=False):
        t_vec = torch.full((batch,), t_curr, device=device, dtype=dtype)
        v = [transformer(img=x.to(dtype), img_ids=img_ids, txt=c.txt, txt_ids=c.txt_ids, timesteps=t_vec, y=c.y,
                         guidance=g, txt_mask=c.mask, **kontext).float() for c in conds]
        velocity = v[0] if len(v) == 1 else v[1] + cfg_scale * (v[0] - v[1])
        x = x + (t_next - t_curr) * velocity
    return unpack_latents(x, h, w)


def latents_to_pil(ae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """Decode scaled/shifted latents with the AE and quantise like diffusers' image processor."""
    param = next(ae.parameters())
    with torch.no_grad():
        images = ae.decode(latents.to(device=param.device, dtype=param.dtype)).float()
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]


def start_and_reference(noise: torch.Tensor, control: torch.Tensor | None, objective: Objective
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the latents at t = 1, the Kontext reference latents or None) for a control latent and an objective."""
    if control is None:
        return noise, None
    control = control.float().cpu().expand(noise.shape[0], -1, -1, -1)
    reference = control if objective.reference_tokens else None
    if not objective.from_control:
        return noise, reference
    if control.shape != noise.shape:
        raise ValueError(f"a flow_from_control LoRA needs the control at the output size: control latents "
                         f"{tuple(control.shape[-2:])}, output {tuple(noise.shape[-2:])}")
    return control_endpoint(control, noise, objective.control_noise_std), reference


def generate_latents(transformer: torch.nn.Module, cond: TextEncoding, settings: SampleSettings,
                     guidance_embed: bool, progress: bool = True,
                     neg_cond: TextEncoding | None = None, control: torch.Tensor | None = None) -> torch.Tensor:
    """Clean latents [B, 16, h, w] for precomputed text conditioning (the trainer's cached-TE path);
    `neg_cond` (the negative prompt's encoding) is used when `settings.cfg_scale` != 1; `control` [1, 16, h', w']
    (encode_control) is used as `settings.objective_spec` says (reference tokens and/or the start)."""
    if settings.uses_cfg and neg_cond is None:
        raise ValueError("cfg_scale != 1 needs the negative prompt's encoding (neg_cond)")
    noise = draw_noise(settings.width, settings.height, seeded_generator(settings.seed), batch=cond.t5_out.shape[0])
    start, reference = start_and_reference(noise, control, settings.objective_spec)
    schedule = get_schedule(settings.steps, image_seq_len(settings.width, settings.height), settings.shift)
    return denoise(transformer, start, cond, schedule, settings.guidance if guidance_embed else None,
                   settings.apply_t5_attn_mask, progress, neg_cond if settings.uses_cfg else None, settings.cfg_scale,
                   reference)


def encode_prompts(text_encoders: FluxTextEncoders, settings: SampleSettings) -> tuple[TextEncoding,
                                                                                        TextEncoding | None]:
    """(prompt encoding, negative prompt encoding or None when CFG is off), without gradients."""
    with torch.no_grad():
        cond = text_encoders.encode([settings.prompt], settings.t5_max_length, settings.apply_t5_attn_mask)
        neg = None
        if settings.uses_cfg:
            neg = text_encoders.encode([settings.negative_prompt], settings.t5_max_length,
                                       settings.apply_t5_attn_mask)
    return cond, neg


# A 16k-pixel side or 10k steps is a typo, not a request (and would run out of memory or time much later).
MAX_SIDE, MAX_STEPS = 16384, 10000


def check_sample_values(where: str, width: int, height: int, steps: int | None, guidance: float,
                        cfg_scale: float, seed: int | None = None) -> None:
    """One line naming `where` for a size, step count, scale or seed no image can be made with."""
    for name, v in (("width (--w)", width), ("height (--h)", height)):
        if not PIXEL_MULTIPLE <= v <= MAX_SIDE:
            raise UserError(f"{where}: {name} {v} must be in [{PIXEL_MULTIPLE}, {MAX_SIDE}] pixels")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise UserError(f"{where}: steps (--s) {steps} must be in [1, {MAX_STEPS}]")
    for name, v in (("guidance (--g)", guidance), ("CFG scale (--l / --c)", cfg_scale)):
        if not math.isfinite(v):
            raise UserError(f"{where}: {name} {v} must be a finite number")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise UserError(f"{where}: seed (--d) {seed} is out of range (torch seeds are 64-bit: 0 .. 2**64-1)")


def sample_settings(guidance_embed: bool, prompt: str, width: int, height: int, steps: int, guidance: float,
                    seed: int, shift: bool | None = None, t5_max_length: int | None = None,
                    apply_t5_attn_mask: bool = False, negative_prompt: str = "",
                    cfg_scale: float = 1.0, control_image: str = "",
                    objective: Objective | None = None) -> SampleSettings:
    """Settings with FLUX's defaults filled in: dev (guidance-embedded) is shifted and reads 512 T5 tokens,
    schnell is unshifted and reads 256; sizes are floored to multiples of 16."""
    dev = bool(guidance_embed)
    step = AE_DOWNSAMPLE * PATCH
    width, height = width // step * step, height // step * step
    return SampleSettings(prompt=prompt, width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                          shift=dev if shift is None else shift,
                          t5_max_length=t5_max_length or default_t5_max_length(dev),
                          apply_t5_attn_mask=apply_t5_attn_mask, negative_prompt=negative_prompt or "",
                          cfg_scale=cfg_scale, control_image=control_image or "",
                          objective=(objective or Objective()).kind,
                          control_noise_std=(objective or Objective()).control_noise_std,
                          reference_tokens=(objective or Objective()).reference_tokens)


def generate_image(transformer: torch.nn.Module, ae: torch.nn.Module, text_encoders: FluxTextEncoders,
                   prompt: str, width: int, height: int, steps: int, guidance: float, seed: int, *,
                   shift: bool | None = None, t5_max_length: int | None = None, apply_t5_attn_mask: bool = False,
                   negative_prompt: str = "", cfg_scale: float = 1.0, progress: bool = True,
                   control: Image.Image | None = None, control_resize: bool = True,
                   objective: Objective | None = None, control_name: str = "control") -> Image.Image:
    """One image for `prompt`: encode, sample with the FLUX schedule, decode. Sizes are floored to 16.
    With `control` (a PIL image) this is a Kontext edit; `objective` says how the control is used."""
    dev = bool(transformer.params.guidance_embed)
    name = control_name if control is not None else ""
    s = sample_settings(dev, prompt, width, height, steps, guidance, seed, shift, t5_max_length,
                        apply_t5_attn_mask, negative_prompt, cfg_scale, name, objective)
    cond, neg = encode_prompts(text_encoders, s)
    latents = None if control is None else encode_control(ae, control, s.width, s.height, control_resize)
    return latents_to_pil(ae, generate_latents(transformer, cond, s, dev, progress, neg, latents))[0]


# ---------------------------------------------------------------- PNG with settings in its metadata


def parameters_text(s: SampleSettings, model: str = "") -> str:
    """A1111/kohya-style "parameters" text: the prompt, then one line of comma-separated settings."""
    fields = [f"Steps: {s.steps}", "Sampler: Euler", f"Guidance: {s.guidance:g}", f"Seed: {s.seed}",
              f"Size: {s.width}x{s.height}", f"Shift: {'FLUX' if s.shift else 'none'}",
              f"T5 tokens: {s.t5_max_length}"]
    if s.uses_cfg:
        fields.insert(2, f"CFG scale: {s.cfg_scale:g}")
    if s.control_image:
        fields.append(f"Control image: {s.control_image}")
        fields.append(f"Objective: {s.objective}" + (f" (noise {s.control_noise_std:g})" if s.control_noise_std else ""))
    if model:
        fields.append(f"Model: {model}")
    negative = f"Negative prompt: {s.negative_prompt}\n" if s.uses_cfg else ""
    return f"{s.prompt}\n{negative}" + ", ".join(fields)


def save_png(image: Image.Image, path: str | os.PathLike, settings: SampleSettings,
             extra: dict | None = None) -> Path:
    """Write `image` as PNG with "parameters" and a JSON chunk of `settings` (+ `extra`), atomically."""
    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", parameters_text(settings, str((extra or {}).get("model", ""))))
    info.add_text(PNG_JSON_KEY, json.dumps({**asdict(settings), **(extra or {})}, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    write_bytes_atomic(path, buf.getvalue())  # through the one write seam (disk full: one line)
    return path


def read_png_settings(path: str | os.PathLike) -> dict:
    """The JSON settings chunk written by `save_png` (empty dict when absent)."""
    with Image.open(path) as im:
        raw = im.text.get(PNG_JSON_KEY) if hasattr(im, "text") else None
    return json.loads(raw) if raw else {}
