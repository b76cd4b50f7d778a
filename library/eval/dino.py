"""DINO image embeddings for the DreamBooth paper's subject-fidelity metric (mean cosine similarity of a
generated image to the reference images). The embedding is the final-layer CLS token (`last_hidden_state
[:, 0]`, after the last layer norm): what DINO ViT-S/16 and DINOv2 use as the global image descriptor
(ViTModel's `pooler_output` would add an untrained dense + tanh pooler, so it is not used)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from library.eval.models import batches, load_pretrained

DINO_TYPES = ("dinov2", "dinov2_with_registers", "vit")


class DinoEmbedder:
    def __init__(self, folder: str | Path, device: torch.device | None = None, batch_size: int = 32):
        self.processor, self.model, self.device = load_pretrained(
            folder, "--dino_model", DINO_TYPES, "the model and its image processor", AutoImageProcessor, AutoModel,
            device)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for chunk in batches([im.convert("RGB") for im in images], self.batch_size):
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)
