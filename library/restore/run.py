"""Restore a folder of images with a (Kontext / restoration) LoRA: batching, resume, metrics.

Each input image is the control image of one Kontext edit at its own size (floored to 16), sampled with the
same seed for every image, so `flux_restore.py` gives for an image exactly what
`flux_minimal_inference.py --control_image IMAGE --seed SEED` gives; batching groups images of one size and
draws each image's noise from its own generator, so the batch size never changes a result.

Resume: an output PNG whose recorded settings equal this run's is kept (not recomputed); one written with
other settings stops the run with a one-line error instead of being overwritten.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from library.data.images import list_images
from library.errors import UserError
from library.flux.text_encoders import TextEncoding
from library.sampling import (AE_DOWNSAMPLE, PATCH, SampleSettings, control_pixels, denoise, draw_noise,
                              get_schedule, image_seq_len, latents_to_pil, open_control_image, read_png_settings,
                              save_png, seeded_generator, start_and_reference)

SIZE_STEP = AE_DOWNSAMPLE * PATCH
RESTORE_KEY = "restore"  # the PNG JSON chunk's key holding what makes the output (compared on resume)


@dataclass(frozen=True)
class Job:
    name: str  # file stem: input, output and reference share it
    source: Path  # the input image (degraded, or clean with --degrade)
    output: Path
    width: int
    height: int


def output_size(image_size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    w, h = width or image_size[0], height or image_size[1]
    w, h = w // SIZE_STEP * SIZE_STEP, h // SIZE_STEP * SIZE_STEP
    if min(w, h) < SIZE_STEP:
        raise ValueError(f"{w}x{h} is smaller than {SIZE_STEP} px")
    return w, h


def plan_jobs(inputs: list[Path], out_dir: Path, width: int | None, height: int | None,
              sizes: Callable[[Path], tuple[int, int]]) -> list[Job]:
    stems: dict[str, Path] = {}
    jobs = []
    for p in inputs:
        if p.stem in stems:
            raise UserError(f"{p}: same name as {stems[p.stem]}; outputs are named by the stem, rename one")
        stems[p.stem] = p
        try:
            w, h = output_size(sizes(p), width, height)
        except ValueError as err:
            raise UserError(f"{p}: {err}") from None
        jobs.append(Job(p.stem, p, out_dir / f"{p.stem}.png", w, h))
    return jobs


def split_done(jobs: list[Job], record: Callable[[Job], dict]) -> tuple[list[Job], list[Job]]:
    """(to do, already done with these settings); an output made with other settings is an error."""
    todo, done = [], []
    for j in jobs:
        if not j.output.exists():
            todo.append(j)
            continue
        try:
            found = read_png_settings(j.output).get(RESTORE_KEY)
        except (OSError, ValueError):
            found = None
        if found != json.loads(json.dumps(record(j))):
            raise UserError(f"{j.output}: exists and was made with other settings (or is not ours); use another "
                            "--output_dir or delete it to redo it")
        done.append(j)
    return todo, done


def batches(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    """Consecutive jobs of one output size, at most `batch_size` each (input order kept within a size)."""
    by_size: dict[tuple[int, int], list[Job]] = {}
    for j in jobs:
        by_size.setdefault((j.width, j.height), []).append(j)
    for group in by_size.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


@dataclass
class Restorer:
    """The models and the fixed conditioning of one restore run."""

    transformer: torch.nn.Module
    ae: torch.nn.Module
    cond: TextEncoding  # the prompt's encoding, batch 1
    settings: SampleSettings  # prompt, steps, guidance, seed, shift, objective (width/height per job)
    guidance_embed: bool

    @torch.no_grad()
    def restore(self, controls: list[Image.Image], width: int, height: int) -> list[Image.Image]:
        s, n = self.settings, len(controls)
        param = next(self.ae.parameters())
        pixels = torch.cat([control_pixels(c, width, height) for c in controls]).to(param.device, param.dtype)
        control = self.ae.encode(pixels).float()
        noise = torch.cat([draw_noise(width, height, seeded_generator(s.seed)) for _ in range(n)])
        start, reference = start_and_reference(noise, control, s.objective_spec)
        cond = TextEncoding(*(t.expand(n, *t.shape[1:]) for t in (self.cond.t5_out, self.cond.clip_pooled,
                                                                  self.cond.t5_attn_mask)))
        schedule = get_schedule(s.steps, image_seq_len(width, height), s.shift)
        latents = denoise(self.transformer, start, cond, schedule, s.guidance if self.guidance_embed else None,
                          s.apply_t5_attn_mask, progress=False, reference=reference)
        return latents_to_pil(self.ae, latents)


def job_settings(base: SampleSettings, job: Job) -> SampleSettings:
    return dataclasses.replace(base, width=job.width, height=job.height, control_image=job.source.name)


def restore_jobs(restorer: Restorer, jobs: list[Job], batch_size: int, load: Callable[[Job], Image.Image],
                 extra: Callable[[Job], dict]) -> list[Path]:
    """Restore `jobs` in batches, writing each PNG (atomically) as soon as its batch is done."""
    written = []
    with tqdm(total=len(jobs), desc="restoring", unit="img", dynamic_ncols=True) as bar:
        for batch in batches(jobs, batch_size):
            images = restorer.restore([load(j) for j in batch], batch[0].width, batch[0].height)
            for j, im in zip(batch, images):
                written.append(save_png(im, j.output, job_settings(restorer.settings, j), extra(j)))
            bar.update(len(batch))
    return written


def find_reference(reference_dir: Path, name: str) -> Path:
    hits = [p for p in list_images(reference_dir) if p.stem == name]
    if not hits:
        raise UserError(f"{reference_dir}: no reference image named {name}.* (given as --reference_dir)")
    return hits[0]


def fit(image: Image.Image, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] at the output size (Lanczos when the size differs), what metrics compare."""
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(rgb)


def load_input(path: Path) -> Image.Image:
    return open_control_image(path, "an input of --input_dir")
