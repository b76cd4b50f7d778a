"""Tiny seeded random CLIP and DINOv2 models in transformers layout (config, weights, processor files),
for tests and the offline demo study. The CLIP folder uses the real CLIP-L tokenizer shipped in
library/flux/tokenizers/clip_l, so tokenization and truncation are the real ones; the numbers mean nothing."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                          Dinov2Config, Dinov2Model)

CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "flux" / "tokenizers" / "clip_l"
MEAN_IMAGENET, STD_IMAGENET = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **layer),
                        vision_config=dict(image_size=image_size, patch_size=8, **layer), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image, tokenizer=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER))).save_pretrained(folder)
    return Path(folder)


def write_tiny_dino(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=image_size, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=MEAN_IMAGENET, image_std=STD_IMAGENET).save_pretrained(folder)
    return Path(folder)
