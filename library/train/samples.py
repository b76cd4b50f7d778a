"""Sample images during training (kohya's --sample_prompts / --sample_every_n_* / --sample_at_first).

The prompts are encoded once, before the text encoders may be freed (kohya does the same when text-encoder
outputs are cached). Images use library/sampling.py, the sampler and seed convention of
flux_minimal_inference.py, so a preview with `--d 42` is the image inference gives for seed 42 with the
LoRA at strength 1. A prompt without `--d` gets seed `--seed` + its index, the same at every sampling, so
previews of successive steps are comparable. Files: output_dir/sample/<name>_<step>_<NN>_<prompt>.png
(`e<epoch>` instead of the step for epoch-triggered samples). `--l` (true CFG scale) with `--n` (negative
prompt) runs two passes per step, as flux_minimal_inference.py's --cfg_scale.

Reference images (Kontext edits / restoration): a prompt's `--ci PATH` is sampled as
flux_minimal_inference.py --control_image does, with the run's objective (--flow_from_control starts from the
control). For a dataset of control or degradation pairs without --sample_prompts, the first few training pairs
(their caption, bucket size, control and target, centre crop) are sampled. Such a sample PNG shows
control | output | target side by side (no target panel for --ci prompts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from library.objective import Objective
from library.sampling import (encode_control, generate_latents, latents_to_pil, open_control_image, sample_settings,
                              save_png)
from library.train.prompts import SamplePrompt

PAIR_SAMPLES = 2  # training pairs sampled when a control/degradation dataset has no --sample_prompts


@dataclass
class EncodedPrompt:
    prompt: SamplePrompt
    cond: Any  # TextEncoding on the CPU
    neg: Any = None  # the negative prompt's TextEncoding when true CFG is used (--l != 1)
    control: np.ndarray | None = None  # uint8 [H, W, 3] reference image (--ci or a training pair's control)
    target: np.ndarray | None = None  # uint8 [H, W, 3] a training pair's target (shown beside the output)


def _to(enc: Any, device: Any) -> Any:
    return None if enc is None else type(enc)(**{k: v.detach().to(device) for k, v in vars(enc).items()})


def encode_prompts(prompts: list[SamplePrompt], text: Any, t5_max_length: int, apply_t5_attn_mask: bool,
                   pairs: list[tuple[np.ndarray, np.ndarray | None]] | None = None) -> list[EncodedPrompt]:
    """Encode each prompt once; `pairs` (control, target) per prompt for training-pair samples."""
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            cond = text.encode([p.prompt], t5_max_length, apply_t5_attn_mask)
            neg = text.encode([p.negative_prompt], t5_max_length, apply_t5_attn_mask) if p.scale != 1.0 else None
            control, target = pairs[i] if pairs else (None, None)
            if p.control_image:
                control = np.asarray(open_control_image(p.control_image, "--ci in --sample_prompts"))
            out.append(EncodedPrompt(p, _to(cond, "cpu"), _to(neg, "cpu"), control, target))
    return out


def pair_prompts(dataset: Any, n: int = PAIR_SAMPLES, steps: int = 20, guidance: float = 3.5
                 ) -> tuple[list[SamplePrompt], list[tuple[np.ndarray, np.ndarray]]]:
    """The first `n` training pairs (in dataset order) of a control/degradation dataset as sample prompts."""
    prompts, pairs = [], []
    for its in dataset.items:
        for it in its:
            if len(prompts) >= n:
                return prompts, pairs
            if it.is_reg or it.uid in dataset.bad or (it.cond_path is None and it.variant is None):
                continue
            target, control = dataset.pair(it)
            if control is None:  # a conditioning folder used as loss masks
                continue
            w, h = it.assignment.bucket
            prompts.append(SamplePrompt(index=len(prompts), prompt=dataset.caption(it.uid, 0, 0, 0) or "restore",
                                        width=w, height=h, sample_steps=steps, guidance_scale=guidance))
            pairs.append((control, target))
    return prompts, pairs


def side_by_side(panels: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """The panels resized to `size` (W, H), left to right."""
    sheet = Image.new("RGB", (size[0] * len(panels), size[1]))
    for i, im in enumerate(panels):
        sheet.paste(im.convert("RGB").resize(size, Image.Resampling.LANCZOS) if im.size != size else im,
                    (i * size[0], 0))
    return sheet


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "prompt"


def sample_path(out_dir: Path, name: str, step: int, epoch: int | None, index: int, prompt: str) -> Path:
    tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return out_dir / "sample" / f"{name}_{tag}_{index:02d}_{_slug(prompt)}.png"


def write_samples(prompts: list[EncodedPrompt], transformer: torch.nn.Module, ae: torch.nn.Module,
                  out_dir: Path, name: str, step: int, epoch: int | None, base_seed: int, guidance_embed: bool,
                  t5_max_length: int, apply_t5_attn_mask: bool, autocast: Any,
                  objective: Objective | None = None) -> list[Path]:
    paths = []
    device = next(p for p in transformer.parameters()).device
    rng = torch.get_rng_state()  # sampling draws from its own generators; keep the global stream untouched
    try:
        for e in prompts:
            p = e.prompt
            seed = p.seed if p.seed is not None else base_seed + p.index
            s = sample_settings(guidance_embed, p.prompt, p.width, p.height, p.sample_steps, p.guidance_scale, seed,
                                t5_max_length=t5_max_length, apply_t5_attn_mask=apply_t5_attn_mask,
                                negative_prompt=p.negative_prompt, cfg_scale=p.scale,
                                control_image=Path(p.control_image).name if p.control_image else
                                ("training pair" if e.control is not None else ""), objective=objective)
            control = None if e.control is None else \
                encode_control(ae, Image.fromarray(e.control), s.width, s.height)
            with torch.no_grad(), autocast():
                latents = generate_latents(transformer, _to(e.cond, device), s, guidance_embed, progress=False,
                                           neg_cond=_to(e.neg, device), control=control)
            image = latents_to_pil(ae, latents)[0]
            if e.control is not None:  # control | output (| target)
                panels = [Image.fromarray(e.control), image] + ([Image.fromarray(e.target)] if e.target is not None
                                                                else [])
                image = side_by_side(panels, image.size)
            path = sample_path(out_dir, name, step, epoch, p.index, p.prompt)
            save_png(image, path, s, extra={"step": step, "epoch": epoch, "lora": name})
            paths.append(path)
    finally:
        torch.set_rng_state(rng)
    return paths
