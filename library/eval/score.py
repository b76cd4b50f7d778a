"""Score a folder of images: CLIP score, CLIP-I, DINO, frequency metrics (and the optional LLM judge),
one CSV row per image. Models run in batches on the GPU when there is one; images are read per batch."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from library.atomic import atomic_target, check_writable_folder, write_text_atomic
from library.errors import UserError
from library.eval import frequency as F
from library.eval.clip import ClipScorer, clip_scores, mean_reference_similarity
from library.eval.dino import DINO_TYPES, DinoEmbedder
from library.eval.judge import judge_rows
from library.eval.models import batches, model_type, pick_device
from library.eval.names import ImageId, parse_image_name
from library.eval.prompts import apply_class_tokens, load_eval_prompts
from library.eval.table import ID_COLUMNS, write_rows
from library.sampling import PNG_JSON_KEY

log = logging.getLogger(__name__)
METRICS = ("clip_score", "clip_i", "dino", "hf_energy", "hf_ratio", "grid16")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ScoreConfig:
    images: Path
    out: Path
    prompts: Path | None = None  # else each PNG's own prompt (metadata written by `render`)
    clip_model: Path | None = None
    dino_model: Path | None = None
    reference_dir: Path | None = None
    class_token_map: tuple[tuple[str, str], ...] = ()
    device: str | None = None
    batch_size: int = 32
    judge: object | None = None  # a library.eval.judge.JudgeConfig


@dataclass
class Item:
    path: Path
    id: ImageId
    prompt: str
    metrics: dict = field(default_factory=dict)


def spectra_path(out: Path) -> Path:
    return out.with_name(out.stem + "_spectra.npz")


def notes_path(out: Path) -> Path:
    """Why a metric column is empty (JSON {column: reason}), read by the report."""
    return out.with_name(out.stem + "_notes.json")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not a readable image ({err.__class__.__name__}); remove or replace it") from None


def _png_prompt(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            raw = getattr(im, "text", {}).get(PNG_JSON_KEY)
    except (UnidentifiedImageError, OSError):
        return None
    try:
        return json.loads(raw).get("prompt") if raw else None
    except (json.JSONDecodeError, AttributeError):
        return None


def collect(cfg: ScoreConfig) -> list[Item]:
    """The images of --images with their ids and prompts (one-line errors for names and missing prompts)."""
    if not cfg.images.is_dir():
        raise UserError(f"{cfg.images}: --images is not a folder")
    files = sorted(p for p in cfg.images.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise UserError(f"{cfg.images}: --images holds no .png images")
    prompts = {p.id: p.text for p in load_eval_prompts(cfg.prompts)} if cfg.prompts else None
    items = []
    for f in files:
        iid = parse_image_name(f.name, set(prompts), str(cfg.prompts)) if prompts is not None \
            else parse_image_name(f.name)
        text = prompts.get(iid.prompt_id) if prompts is not None else _png_prompt(f)
        if text is None:
            where = f"the prompts file {cfg.prompts}" if prompts is not None else "its PNG metadata (give --prompts)"
            raise UserError(f"{f}: prompt id {iid.prompt_id!r} is not in {where}")
        items.append(Item(f, iid, text))
    return items


def _references(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: --reference_dir is not a folder")
    refs = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not refs:
        raise UserError(f"{folder}: --reference_dir holds no images ({', '.join(IMAGE_EXTS)})")
    return refs


def _base_of(items: list[Item]) -> dict[tuple[str, int | None], Item]:
    return {(it.id.prompt_id, it.id.seed): it for it in items if it.id.is_base}


def score_items(cfg: ScoreConfig, items: list[Item], notes: dict[str, str]) -> dict[str, np.ndarray]:
    """Fill `it.metrics` of every item; returns the radial spectra by file name."""
    device = pick_device(cfg.device)
    clip = ClipScorer(cfg.clip_model, device, cfg.batch_size) if cfg.clip_model else None
    dino = DinoEmbedder(cfg.dino_model, device, cfg.batch_size) if cfg.dino_model and cfg.reference_dir else None
    refs = [_open(p) for p in _references(cfg.reference_dir)] if cfg.reference_dir else []
    ref_clip = clip.image_embeds(refs) if clip and refs else None
    ref_dino = dino.image_embeds(refs) if dino else None
    _explain_missing(cfg, notes)
    spectra: dict[str, np.ndarray] = {}
    for chunk in tqdm(list(batches(items, cfg.batch_size)), desc="scoring", unit="batch"):
        images = [_open(it.path) for it in chunk]
        if clip:
            emb = clip.image_embeds(images)
            texts = clip.text_embeds([apply_class_tokens(it.prompt, cfg.class_token_map) for it in chunk])
            for it, s in zip(chunk, clip_scores(emb, texts).tolist()):
                it.metrics["clip_score"] = s
            if ref_clip is not None:
                for it, s in zip(chunk, mean_reference_similarity(emb, ref_clip).tolist()):
                    it.metrics["clip_i"] = s
        if dino:
            for it, s in zip(chunk, mean_reference_similarity(dino.image_embeds(images), ref_dino).tolist()):
                it.metrics["dino"] = s
        for it, im in zip(chunk, images):
            g = F.luminance(im)
            it.metrics["hf_energy"] = F.hf_energy(g)
            it.metrics["grid16"] = F.periodic_score(g)
            spectra[it.id.file] = F.radial_spectrum(g)[1]
    _hf_ratios(items, notes)
    return spectra


def _hf_ratios(items: list[Item], notes: dict[str, str]) -> None:
    base = _base_of(items)
    for it in items:
        b = base.get((it.id.prompt_id, it.id.seed))
        if b is not None and b.metrics.get("hf_energy"):
            it.metrics["hf_ratio"] = it.metrics["hf_energy"] / b.metrics["hf_energy"]
    if not base:
        notes["hf_ratio"] = "no base-model images (strength 0 / lora 'base') to compare with"


def _explain_missing(cfg: ScoreConfig, notes: dict[str, str]) -> None:
    if not cfg.clip_model:
        notes["clip_score"] = notes["clip_i"] = "no --clip_model given"
    elif not cfg.reference_dir:
        notes["clip_i"] = "no --reference_dir given"
    if not (cfg.dino_model and cfg.reference_dir):
        notes["dino"] = "needs --dino_model and --reference_dir"


def _row(it: Item) -> dict:
    i = it.id
    return {"file": i.file, "lora": i.lora, "step": i.step, "prompt_id": i.prompt_id, "seed": i.seed,
            "strength": i.strength, **it.metrics}


def save_spectra(path: Path, spectra: dict[str, np.ndarray]) -> None:
    files = sorted(spectra)
    freqs = F.radial_spectrum(np.zeros((F.N_BINS * 2, F.N_BINS * 2)))[0]
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, freqs=freqs, files=np.array(files), spectra=np.stack([spectra[k] for k in files]))


def score(cfg: ScoreConfig) -> tuple[Path, list[dict]]:
    """Score every image; write the CSV, the spectra (.npz) and the notes; returns (csv path, rows)."""
    _check_out(cfg.out)
    if cfg.clip_model:  # a wrong model folder fails before any image is read
        model_type(cfg.clip_model, "--clip_model", ("clip",))
    if cfg.dino_model:
        model_type(cfg.dino_model, "--dino_model", DINO_TYPES)
    items = collect(cfg)
    notes: dict[str, str] = {}
    spectra = score_items(cfg, items, notes)
    columns = [*ID_COLUMNS, *METRICS]
    rows = [_row(it) for it in items]
    write_rows(cfg.out, columns, rows)
    save_spectra(spectra_path(cfg.out), spectra)
    if cfg.judge is not None:
        columns, rows = judge_rows(cfg.judge, items, rows, columns, notes, cfg.out)
    write_text_atomic(notes_path(cfg.out), json.dumps(notes, indent=1, sort_keys=True))
    return cfg.out, rows


def _check_out(out: Path) -> None:
    """Fail before any model is loaded if the CSV could not be written (nothing is created here)."""
    if out.is_dir():
        raise UserError(f"{out}: --out is a folder; give a file name such as {out / 'scores.csv'}")
    check_writable_folder(out.parent, f"{out}: --out's folder")
