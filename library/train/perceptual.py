"""--perceptual_loss_weight: a VGG16 feature loss between the decoded x̂₀ and the decoded target.

x̂₀ = x_σ − σ·v̂ (library/flow.x0_from_velocity) is decoded by the frozen AE with gradients (they flow through
the decoder back to the prediction, hence to the LoRA), the target latents without; both go through the frozen
VGG16 of library/vision/vgg.py. The step adds weight × this on every --perceptual_every_n_steps-th step, so
its cost (an AE decode with backward) is bounded.
"""

from __future__ import annotations

import torch

from library.vision.vgg import VGG16Features, load_vgg16, perceptual_distance


class PerceptualLoss:
    def __init__(self, ae: torch.nn.Module, vgg: VGG16Features):
        self.ae, self.vgg = ae, vgg

    def __call__(self, x0_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = next(self.ae.parameters()).dtype
        pred = self.ae.decode(x0_hat.to(dtype))
        with torch.no_grad():
            ref = self.ae.decode(target.to(dtype))
        vdtype = next(self.vgg.parameters()).dtype
        return perceptual_distance(self.vgg, pred.to(vdtype), ref.to(vdtype)).mean()


def build_perceptual(path: str, ae: torch.nn.Module) -> PerceptualLoss:
    param = next(ae.parameters())
    return PerceptualLoss(ae, load_vgg16(path, param.device, param.dtype))
