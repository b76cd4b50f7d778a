"""Sample images during training (kohya's --sample_prompts / --sample_every_n_* / --sample_at_first).

The prompts are encoded once, before the text encoders may be freed (kohya does the same when text-encoder
outputs are cached). Images use library/sampling.py, the sampler and seed convention of
flux_minimal_inference.py, so a preview with `--d 42` is the image inference gives for seed 42 with the
LoRA at strength 1. A prompt without `--d` gets seed `--seed` + its index, the same at every sampling, so
previews of successive steps are comparable. Files: output_dir/sample/<name>_<step>_<NN>_<prompt>.png
(`e<epoch>` instead of the step for epoch-triggered samples). `--l` (true CFG scale) with `--n` (negative
prompt) runs two passes per step, as flux_minimal_inference.py's --cfg_scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.sampling import generate_latents, latents_to_pil, sample_settings, save_png
from library.train.prompts import SamplePrompt


@dataclass
class EncodedPrompt:
    prompt: SamplePrompt
    cond: Any  # TextEncoding on the CPU
    neg: Any = None  # the negative prompt's TextEncoding when true CFG is used (--l != 1)


def _to(enc: Any, device: Any) -> Any:
    return None if enc is None else type(enc)(**{k: v.detach().to(device) for k, v in vars(enc).items()})


def encode_prompts(prompts: list[SamplePrompt], text: Any, t5_max_length: int,
                   apply_t5_attn_mask: bool) -> list[EncodedPrompt]:
    out = []
    with torch.no_grad():
        for p in prompts:
            cond = text.encode([p.prompt], t5_max_length, apply_t5_attn_mask)
            neg = text.encode([p.negative_prompt], t5_max_length, apply_t5_attn_mask) if p.scale != 1.0 else None
            out.append(EncodedPrompt(p, _to(cond, "cpu"), _to(neg, "cpu")))
    return out


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "prompt"


def sample_path(out_dir: Path, name: str, step: int, epoch: int | None, index: int, prompt: str) -> Path:
    tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return out_dir / "sample" / f"{name}_{tag}_{index:02d}_{_slug(prompt)}.png"


def write_samples(prompts: list[EncodedPrompt], transformer: torch.nn.Module, ae: torch.nn.Module,
                  out_dir: Path, name: str, step: int, epoch: int | None, base_seed: int, guidance_embed: bool,
                  t5_max_length: int, apply_t5_attn_mask: bool, autocast: Any) -> list[Path]:
    paths = []
    device = next(p for p in transformer.parameters()).device
    rng = torch.get_rng_state()  # sampling draws from its own generators; keep the global stream untouched
    try:
        for e in prompts:
            p = e.prompt
            seed = p.seed if p.seed is not None else base_seed + p.index
            s = sample_settings(guidance_embed, p.prompt, p.width, p.height, p.sample_steps, p.guidance_scale, seed,
                                t5_max_length=t5_max_length, apply_t5_attn_mask=apply_t5_attn_mask,
                                negative_prompt=p.negative_prompt, cfg_scale=p.scale)
            with torch.no_grad(), autocast():
                latents = generate_latents(transformer, _to(e.cond, device), s, guidance_embed, progress=False,
                                           neg_cond=_to(e.neg, device))
            image = latents_to_pil(ae, latents)[0]
            path = sample_path(out_dir, name, step, epoch, p.index, p.prompt)
            save_png(image, path, s, extra={"step": step, "epoch": epoch, "lora": name})
            paths.append(path)
    finally:
        torch.set_rng_state(rng)
    return paths
