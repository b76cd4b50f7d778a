"""CLIP metrics: `clip_score` (text-image) and `clip_i` (image-image), with the user's CLIP folder.

clip_score is torchmetrics' CLIPScore definition: 100 · max(cos(E_img, E_txt), 0) with the projected
embeddings, the CLIPProcessor's preprocessing (resize, center crop, normalise; text padded, then cut to
the text model's max_position_embeddings as torchmetrics does). We compute the embeddings directly
(`visual_projection(vision_model(x).pooler_output)`), since torchmetrics 1.9 calls `get_image_features`,
which returns an output object, not a tensor, in transformers 5. clip_i is the DreamBooth paper's
CLIP-I: the mean cosine similarity of an image's embedding to those of the reference (training) images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from library.eval.models import batches, load_pretrained

log = logging.getLogger(__name__)


class ClipScorer:
    def __init__(self, folder: str | Path, device: torch.device | None = None, batch_size: int = 32):
        self.processor, self.model, self.device = load_pretrained(
            folder, "--clip_model", ("clip",), "a CLIP model and processor", CLIPProcessor, CLIPModel, device)
        self.batch_size = batch_size
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected image embeddings [N, D], float32 on the CPU (not normalised)."""
        out = []
        for chunk in batches([im.convert("RGB") for im in images], self.batch_size):
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings [N, D]; prompts over the token limit are cut (torchmetrics' truncation)."""
        out = []
        for chunk in batches(list(texts), self.batch_size):
            tok = self.processor(text=chunk, return_tensors="pt", padding=True)
            if tok["input_ids"].shape[1] > self.max_tokens:
                log.warning("a prompt is longer than CLIP's %d tokens and is cut there, as torchmetrics does "
                            "(its end token is lost, so its score is less meaningful)", self.max_tokens)
            ids = tok["input_ids"][:, : self.max_tokens].to(self.device)
            mask = tok["attention_mask"][:, : self.max_tokens].to(self.device)
            pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity [N, M] of rows of a [N, D] and b [M, D]."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair: 100 · max(cos(image_i, text_i), 0) (torchmetrics' CLIPScore)."""
    a = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    b = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (100 * (a * b).sum(-1)).clamp(min=0)


def mean_reference_similarity(embeds: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image: the mean cosine similarity to every reference embedding (CLIP-I, DINO)."""
    return cosine(embeds, reference).mean(dim=1)
