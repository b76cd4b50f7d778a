"""flux_restore.py's work: (degrade) -> plan and resume -> load models -> restore in batches -> measure -> report."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.atomic import atomic_target
from library.data.degrade import degrade, load_degradation_file
from library.data.images import list_images, load_image
from library.errors import UserError
from library.flux.loading import load_autoencoder, load_transformer
from library.flux.text_encoders import FluxTextEncoders
from library.objective import Objective, resolve_objective
from library.restore import report as R
from library.restore.run import (RESTORE_KEY, Job, Restorer, find_reference, fit, job_settings, load_input,
                                 plan_jobs, restore_jobs, split_done)
from library.sampling import encode_prompts, sample_settings
from networks.lora_flux import apply_lora_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreArgs:
    ckpt_path: Path
    clip_l: Path
    t5xxl: Path
    ae: Path
    lora_weights: tuple[tuple[Path, float], ...]
    merge_lora_weights: bool
    input_dir: Path
    output_dir: Path
    reference_dir: Path | None
    degrade: Path | None
    width: int | None
    height: int | None
    gallery_rows: int
    prompt: str
    steps: int | None
    guidance: float
    seed: int
    batch_size: int
    no_shift: bool
    t5xxl_max_token_length: int | None
    objective: str
    control_noise_std: float | None
    flow_reference_tokens: bool
    dtype: str  # compute dtype name
    fp8: bool
    device: torch.device


def degrade_inputs(clean: list[Path], config: Path, seed: int, out_dir: Path) -> list[Path]:
    """Degrade each clean image (variant 0, keyed by its file name) into out_dir/degraded/<stem>.png."""
    cfg = load_degradation_file(config)
    out = []
    for p in clean:
        target = out_dir / "degraded" / f"{p.stem}.png"
        image = degrade(load_image(p).rgb, cfg, seed, p.name, 0)  # deterministic per (config, seed, name)
        if not target.exists() or not np.array_equal(load_image(target).rgb, image):
            with atomic_target(target) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        out.append(target)
    return out


def _record(a: RestoreArgs, objective: Objective, job: Job) -> dict:
    """What makes an output (compared on resume)."""
    return {"input": job.source.name, "width": job.width, "height": job.height, "prompt": a.prompt,
            "steps": a.steps, "guidance": a.guidance, "seed": a.seed, "shift": not a.no_shift,
            "model": a.ckpt_path.name, "lora_weights": [[p.name, m] for p, m in a.lora_weights],
            "objective": [objective.kind, objective.control_noise_std, objective.reference_tokens],
            "degrade": _digest(a.degrade) if a.degrade else None}


def _digest(path: Path) -> str:
    """The degradation config's content (a changed range must not resume into the old outputs)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def _models(a: RestoreArgs, objective: Objective) -> Restorer:
    dtype = getattr(torch, a.dtype)
    load_transformer(a.ckpt_path, "meta", dtype)  # header checks first: fail before anything is loaded
    load_autoencoder(a.ae, "meta", dtype)
    text = FluxTextEncoders.load(a.clip_l, a.t5xxl, a.device, dtype)
    transformer = load_transformer(a.ckpt_path, a.device, dtype, fp8=a.fp8)
    if a.lora_weights:
        apply_lora_weights(transformer, text.clip, list(a.lora_weights), a.merge_lora_weights, t5=text.t5)
    dev = bool(transformer.params.guidance_embed)
    s = sample_settings(dev, a.prompt, 64, 64, a.steps or (28 if dev else 4), a.guidance, a.seed,
                        shift=False if a.no_shift else None, t5_max_length=a.t5xxl_max_token_length,
                        objective=objective)
    cond, _ = encode_prompts(text, s)
    del text  # the one prompt is encoded: the text encoders are no longer needed
    return Restorer(transformer, load_autoencoder(a.ae, a.device, dtype), cond, s, dev)


def restore_command(a: RestoreArgs) -> str:
    inputs = list_images(a.input_dir)
    if not inputs:
        raise UserError(f"{a.input_dir}: no images found (given as --input_dir)")
    objective = resolve_objective(a.objective, [p for p, _ in a.lora_weights], a.control_noise_std,
                                  a.flow_reference_tokens)
    clean = None
    if a.degrade is not None:
        clean, inputs = inputs, degrade_inputs(inputs, a.degrade, a.seed, a.output_dir)
    sizes = {}

    def size(p: Path) -> tuple[int, int]:
        sizes[p] = load_input(p).size
        return sizes[p]

    jobs = plan_jobs(inputs, a.output_dir, a.width, a.height, size)
    refs = {j.name: find_reference(a.reference_dir, j.name) for j in jobs} if a.reference_dir else \
        {j.name: c for j, c in zip(jobs, clean)} if clean else {}
    todo, done = split_done(jobs, lambda j: _record(a, objective, j))
    if done:
        log.info("resuming: %d of %d image(s) already restored with these settings", len(done), len(jobs))
        print(f"resuming: {len(done)} of {len(jobs)} image(s) already restored with these settings")
    if todo:
        restorer = _models(a, objective)
        extra = {"model": a.ckpt_path.name, "lora_weights": [[str(p), m] for p, m in a.lora_weights]}
        restore_jobs(restorer, todo, a.batch_size, lambda j: load_input(j.source),
                     lambda j: {**extra, RESTORE_KEY: _record(a, objective, j)})
        del restorer
    lines = [f"restored {len(todo)} image(s), kept {len(done)}, in {a.output_dir}"]
    if refs:
        lines.append(_report(a, jobs, refs))
    return "\n".join(lines)


def _report(a: RestoreArgs, jobs: list[Job], refs: dict[str, Path]) -> str:
    scores, triples = R.Scores(), []
    for j in jobs:
        with Image.open(j.output) as im:
            restored = np.asarray(im.convert("RGB"))
        degraded = fit(load_input(j.source), j.width, j.height)
        reference = fit(load_input(refs[j.name]), j.width, j.height)
        scores.add(j.name, (j.source, j.output, refs[j.name]), degraded, restored, reference)
        if len(triples) < a.gallery_rows:
            triples.append((Image.fromarray(degraded), Image.fromarray(restored), Image.fromarray(reference)))
    csv_path = R.write_csv(a.output_dir / "metrics.csv", scores)
    R.write_html(a.output_dir / "gallery.html", scores, f"{a.lora_weights[0][0].name if a.lora_weights else 'base'}"
                 f" on {a.input_dir.name}")
    R.write_sheet(a.output_dir / "gallery.png", triples)
    return f"{scores.summary()}\nmetrics: {csv_path}; gallery: {a.output_dir / 'gallery.html'}"


__all__ = ["RestoreArgs", "restore_command", "degrade_inputs", "job_settings"]
