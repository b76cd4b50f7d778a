"""Scoring the training's sample images as they are made (--eval_clip_model, --eval_reference_dir,
--eval_class_token_map): the mean CLIP score of the --sample_prompts images and, with reference images,
their mean CLIP-I, so the best epoch shows in the loss CSV and the trackers while training runs."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from library.errors import UserError
from library.eval.clip import ClipScorer, clip_scores, mean_reference_similarity
from library.eval.prompts import apply_class_tokens, parse_class_token_map


class SampleScorer:
    def __init__(self, clip_model: str, reference_dir: str | None, class_token_map: list[str] | tuple[str, ...],
                 device: torch.device):
        self.clip = ClipScorer(clip_model, device)
        self.mapping = parse_class_token_map(list(class_token_map or ()))
        self.reference = None
        if reference_dir:
            folder = Path(reference_dir)
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) \
                if folder.is_dir() else []
            if not files:
                raise UserError(f"{folder}: --eval_reference_dir: not a folder of images")
            self.reference = self.clip.image_embeds([_open(p) for p in files])

    def score(self, paths: list[Path], prompts: list[str]) -> dict[str, float]:
        """Means over the images: {'clip_score': …, 'clip_i': …} (clip_i only with reference images)."""
        images = [_open(p) for p in paths]
        emb = self.clip.image_embeds(images)
        texts = self.clip.text_embeds([apply_class_tokens(t, self.mapping) for t in prompts])
        out = {"clip_score": float(clip_scores(emb, texts).mean())}
        if self.reference is not None:
            out["clip_i"] = float(mean_reference_similarity(emb, self.reference).mean())
        return out


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def make_sample_scorer(clip_model: str | None, reference_dir: str | None, class_token_map, device) -> SampleScorer | None:
    if not clip_model:
        if reference_dir:
            raise UserError("--eval_reference_dir needs --eval_clip_model (the CLIP model that embeds the images)")
        return None
    return SampleScorer(clip_model, reference_dir, class_token_map, device)
