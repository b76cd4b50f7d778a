"""VGG16's convolutional features (Simonyan & Zisserman 2015), for a perceptual (feature) loss.

Design note: the weights come from a user-given .safetensors file in torchvision's key layout
(`features.{i}.weight` / `.bias` for the 13 3×3 convolutions at i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26,
28; `classifier.*` may be present and is ignored). Nothing is downloaded. The layer widths are read from the
file (64 … 512 in VGG16; tests use a tiny file of the same layout), the structure is VGG16's: conv-ReLU
pairs, 2×2 max-pooling after conv 2, 4, 7, 10 (and 13, unused here).

The distance follows LPIPS (Zhang et al. 2018) without its learned weights: at relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3 the features are unit-normalised over channels, and the mean squared difference of each
layer is summed. Images are in [-1, 1] and normalised with ImageNet's mean/std, as torchvision's VGG expects.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.flux.safetensors_io import open_checkpoint

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's vgg16().features
POOL_AFTER = (2, 5, 9, 12)  # 1-based conv numbers followed by max-pooling (before the next conv)
TAP_AFTER = (2, 4, 7, 10, 13)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """The 13 convolutions; `forward` returns the five tapped ReLU outputs."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        chans = (3, *widths)
        self.features = nn.ModuleDict({str(i): nn.Conv2d(chans[n], chans[n + 1], 3, padding=1)
                                       for n, i in enumerate(CONV_INDICES)})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = ((image + 1) / 2 - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        taps = []
        for n, i in enumerate(CONV_INDICES, start=1):
            x = F.relu(self.features[str(i)](x))
            if n in TAP_AFTER:
                taps.append(x)
            if n in POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return taps


def perceptual_distance(features: VGG16Features, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_layers mean((f̂_a − f̂_b)²), f̂ = features unit-normalised over channels; [B] per image."""
    total = torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
    for fa, fb in zip(features(a), features(b)):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((fa - fb) ** 2).float().mean(dim=(1, 2, 3))
    return total


def _not_vgg(path: Path, why: str) -> UserError:
    return UserError(f"{path}: --perceptual_model is not VGG16 weights in torchvision's key layout ({why}); "
                     "expected features.0.weight [64, 3, 3, 3] ... features.28.bias as torchvision's vgg16 saves")


def load_vgg16(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> VGG16Features:
    """Strictly load a VGG16 features module (frozen, eval) from a torchvision-layout safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (given as --perceptual_model)")
    try:
        with open_checkpoint(path) as ckpt:
            shapes = dict(ckpt.shapes)
            tensors = {k: ckpt.get(k) for k in shapes if k.startswith("features.")}
    except UserError as err:
        raise UserError(f"{err} (given as --perceptual_model)") from None
    expected = {f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")}
    other = sorted(k for k in shapes if k not in expected and not k.startswith("classifier."))
    missing = sorted(expected - set(shapes))
    if missing or other:
        raise _not_vgg(path, f"missing {missing[0]}" if missing else f"unexpected key {other[0]}")
    widths, prev = [], 3
    for i in CONV_INDICES:
        w, b = shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"]
        if len(w) != 4 or w[1:] != (prev, 3, 3) or b != (w[0],):
            raise _not_vgg(path, f"features.{i}.weight has shape {list(w)}, bias {list(b)}")
        widths.append(w[0])
        prev = w[0]
    with torch.device("meta"):
        model = VGG16Features(tuple(widths))
    model.load_state_dict({k: tensors[k].float() for k in expected}, strict=True, assign=True)
    model.mean, model.std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()
