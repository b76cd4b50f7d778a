"""Render the evaluation grid: LoRA files × strengths × prompts × seeds, with the sampler of
flux_minimal_inference.py (library/sampling.py).

The base model (transformer, text encoders, AE) is loaded once; each LoRA is applied on the fly as
`LoRAModule`s (networks/lora_flux.py), its strength set with `set_multiplier`, and removed (`restore`)
before the next one. Strength 0 is the base model, rendered once per prompt and seed as
`base_0_<promptid>_<seed>_0.png`. Every image is written atomically, so an image that exists is
complete: a rerun (after a crash or a kill) renders only the missing ones.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.eval.models import pick_device
from library.eval.names import BASE, image_name, safe_name
from library.eval.prompts import EvalPrompt
from library.flux.loading import load_autoencoder, load_transformer
from library.flux.safetensors_io import read_metadata
from library.flux.text_encoders import FluxTextEncoders, load_clip_l, load_t5xxl
from library.sampling import (encode_prompts, generate_latents, latents_to_pil, read_png_settings, sample_settings,
                              save_png)
from networks.lora_flux import create_network_from_weights

log = logging.getLogger(__name__)
_STEP = re.compile(r"^(?P<name>.+?)-(?:step(?P<step>\d+)|(?P<epoch>\d{6}))$")


@dataclass(frozen=True)
class LoraFile:
    path: Path
    name: str  # the training run's output name (the part before -stepNNNNNNNN / -NNNNNN)
    step: int  # ss_steps from the metadata, else the name's step (or epoch number), else 0
    metadata: dict = field(default_factory=dict, hash=False, compare=False)
    variant: str = ""  # a study variant's name, written into the PNG metadata


@dataclass(frozen=True)
class RenderConfig:
    ckpt_path: Path
    clip_l: Path
    t5xxl: Path
    ae: Path
    loras: tuple[LoraFile, ...]
    strengths: tuple[float, ...]
    prompts: tuple[EvalPrompt, ...]
    seeds: tuple[int, ...]
    out_dir: Path
    width: int = 1024
    height: int = 1024
    steps: int | None = None  # default: 28 dev, 4 schnell
    guidance: float = 3.5
    t5xxl_max_token_length: int | None = None
    dtype: str = "bfloat16"
    fp8: bool = False
    device: str | None = None


@dataclass(frozen=True)
class Job:
    lora: LoraFile | None  # None: the base model
    strength: float
    prompt: EvalPrompt
    seed: int
    path: Path


def lora_info(path: Path) -> LoraFile:
    md = read_metadata(path)
    stem = path.name[: -len(path.suffix)]
    m = _STEP.match(stem)
    name = m["name"] if m else stem
    step = md.get("ss_steps") or (m and (m["step"] or m["epoch"])) or "0"
    try:
        step_n = int(step)
    except ValueError:
        step_n = 0
    return LoraFile(path, safe_name(name), step_n, md)


def caption_extensions(md: dict) -> str:
    """The caption files a LoRA was trained on: its `ss_datasets` subsets' caption_extension values, sorted and
    joined by ','; "" when the metadata does not say (kohya's own files, --no_metadata, older files)."""
    try:
        datasets = json.loads(md.get("ss_datasets", "[]"))
        exts = {s["caption_extension"] for d in datasets for s in d.get("subsets", []) if s.get("caption_extension")}
    except (ValueError, TypeError, KeyError, AttributeError):
        return ""  # a foreign or hand-edited ss_datasets: nothing to read, not an error
    return ",".join(sorted(exts))


def find_loras(specs: list[str]) -> tuple[LoraFile, ...]:
    """LoRA files from paths, globs and training output folders (their *.safetensors, states left out)."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
        if not found:
            raise UserError(f"{spec}: --loras: no such file, no .safetensors in this folder, or no match of the glob")
        files += [f for f in found if f not in files]
    loras = tuple(lora_info(f) for f in files)
    seen: dict[tuple[str, int], Path] = {}
    for lf in loras:
        if (lf.name, lf.step) in seen:
            raise UserError(f"{lf.path}: --loras: same name and step ({lf.name}, {lf.step}) as {seen[lf.name, lf.step]}; "
                            "image names would collide (rename one file)")
        seen[lf.name, lf.step] = lf.path
    return loras


def plan(cfg: RenderConfig) -> list[Job]:
    """Every image to make, base images first; a strength 0 is the base model (once per prompt and seed)."""
    jobs = []
    if 0 in cfg.strengths or not cfg.loras:
        jobs += [Job(None, 0.0, p, s, cfg.out_dir / image_name(BASE, 0, p.id, s, 0)) for p in cfg.prompts
                 for s in cfg.seeds]
    for lf in cfg.loras:
        for strength in (x for x in cfg.strengths if x != 0):
            jobs += [Job(lf, strength, p, s, cfg.out_dir / image_name(lf.name, lf.step, p.id, s, strength))
                     for p in cfg.prompts for s in cfg.seeds]
    return jobs


def is_done(job: Job, cfg: RenderConfig) -> bool:
    """The image exists (complete: writes are atomic) and was made with these settings; an image of the
    same name made with another prompt, size, step count or LoRA file is an error, not silently reused."""
    if not job.path.exists():
        return False

    try:
        md = read_png_settings(job.path)
    except (OSError, ValueError):
        md = {}
    want = {"prompt": job.prompt.text, "seed": job.seed, "width": cfg.width, "height": cfg.height,
            "strength": job.strength, "lora_file": str(job.lora.path) if job.lora else ""}
    if cfg.steps:
        want["steps"] = cfg.steps
    diff = sorted(k for k, v in want.items() if k in md and md[k] != v) if md else ["(no settings metadata)"]
    if diff:
        raise UserError(f"{job.path}: exists but was rendered with other settings ({', '.join(diff)}); use another "
                        "--out_dir or delete it")
    return True


class Renderer:
    """The loaded base model; `render(jobs)` swaps LoRAs in and out as the jobs need them."""

    def __init__(self, cfg: RenderConfig):
        self.cfg, self.device = cfg, pick_device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        self.transformer = load_transformer(cfg.ckpt_path, self.device, dtype, fp8=cfg.fp8)
        self.ae = load_autoencoder(cfg.ae, self.device, dtype)
        self.text = FluxTextEncoders(load_clip_l(cfg.clip_l, self.device, dtype), load_t5xxl(cfg.t5xxl, self.device, dtype))
        self.dev = bool(self.transformer.params.guidance_embed)
        self._encoded: dict[tuple, object] = {}

    def _encode(self, key: tuple, s) -> object:
        if key not in self._encoded:
            self._encoded[key] = encode_prompts(self.text, s)[0]
        return self._encoded[key]

    def render(self, jobs: list[Job]) -> list[Path]:
        made = []
        todo = [j for j in jobs if not is_done(j, self.cfg)]
        if len(todo) < len(jobs):
            log.info("%d of %d images exist already (resuming)", len(jobs) - len(todo), len(jobs))
        bar = tqdm(total=len(todo), desc="rendering", unit="img")
        for lf in dict.fromkeys(j.lora for j in todo):
            network = self._apply(lf)
            try:
                for job in (j for j in todo if j.lora == lf):
                    made.append(self._one(job, network))
                    bar.update(1)
            finally:
                if network is not None:
                    network.restore()
        bar.close()
        return made

    def _apply(self, lf: LoraFile | None):
        if lf is None:
            return None

        network = create_network_from_weights(1.0, lf.path, self.transformer, self.text.clip, self.text.t5,
                                              for_inference=True)
        network.to(self.device)
        network.apply_to()
        return network

    def _one(self, job: Job, network) -> Path:
        c = self.cfg
        s = sample_settings(self.dev, job.prompt.text, c.width, c.height, c.steps or (28 if self.dev else 4),
                            c.guidance, job.seed, t5_max_length=c.t5xxl_max_token_length)
        te_lora = network is not None and len(network.adapters()) != len(network.adapters("transformer"))
        if network is not None:
            network.set_multiplier(job.strength)
        key = (job.prompt.text, s.t5_max_length) + ((str(job.lora.path), job.strength) if te_lora else ())
        cond = self._encode(key, s)
        latents = generate_latents(self.transformer, cond, s, self.dev, progress=False)
        image = latents_to_pil(self.ae, latents)[0]
        lf = job.lora
        md = lf.metadata if lf else {}
        extra = {"model": c.ckpt_path.name, "model_type": "dev" if self.dev else "schnell", "dtype": c.dtype,
                 "fp8": c.fp8, "lora": lf.name if lf else BASE, "lora_file": str(lf.path) if lf else "",
                 "step": lf.step if lf else 0, "strength": job.strength, "prompt_id": job.prompt.id,
                 "network_dim": md.get("ss_network_dim", ""), "network_alpha": md.get("ss_network_alpha", ""),
                 "resolution": md.get("modelspec.resolution", ""), "variant": lf.variant if lf else "",
                 "caption_extension": caption_extensions(md),
                 "lora_weights": [[str(lf.path), job.strength]] if lf else []}
        return save_png(image, job.path, s, extra)
