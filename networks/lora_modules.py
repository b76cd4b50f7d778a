"""The LoRA layer: `LoRAAdapter` (the trainable down/up pair) and `LoRAModule` (wraps the frozen Linear).

    y = base(x) + multiplier · (alpha / rank) · up(dropout(down(x)))        (Hu et al. 2021, LoRA)

`down` is kaiming-uniform initialised and `up` is zero, so a fresh LoRA leaves the model unchanged.
`alpha` None or 0 means alpha = rank (scale 1), as kohya. Two objects, so that the network owns only the
LoRA parameters while the model tree shows the wrapper explicitly (`print(model)`):

- `LoRAAdapter` holds `lora_down`/`lora_up` (or, with split_qkv, one pair per q/k/v(/mlp) part) and
  `alpha` (a float); it is registered in `LoRANetwork` under its kohya name, so the network's state dict
  keys are kohya's.
- `LoRAModule` replaces the targeted `nn.Linear` (or a subclass, e.g. `Fp8Linear`, or another
  `LoRAModule` when several LoRAs are stacked) in its parent and adds the adapter's output.

Dropouts act only in training mode, as kohya's: `dropout` on the down output (neuron dropout),
`rank_dropout` zeroes whole rank channels per sample and rescales by 1/(1-p), `module_dropout` skips the
whole LoRA for the step.
"""

from __future__ import annotations

import math

from torch import nn
import torch

from library.flux.model import to_fp8
from networks.lora_formats import LoRAWeight, fuse_parts


class LoRAAdapter(nn.Module):
    def __init__(self, lora_name: str, in_features: int, out_features: int, rank: int, alpha: float | None,
                 split_dims: list[int] | None = None, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.split_dims = list(split_dims) if split_dims else None
        if self.split_dims:
            assert sum(self.split_dims) == out_features, (lora_name, split_dims, out_features)
            self.lora_down = nn.ModuleList(nn.Linear(in_features, rank, bias=False) for _ in self.split_dims)
            self.lora_up = nn.ModuleList(nn.Linear(rank, d, bias=False) for d in self.split_dims)
            downs, ups = list(self.lora_down), list(self.lora_up)
        else:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
            downs, ups = [self.lora_down], [self.lora_up]
        for d in downs:
            nn.init.kaiming_uniform_(d.weight, a=math.sqrt(5))
        for u in ups:
            nn.init.zeros_(u.weight)
        alpha = float(rank) if alpha is None or alpha == 0 else float(alpha)
        # a Python float, not a buffer: `network.to(bfloat16)` must not round it (0.3 → 0.30078)
        self.alpha = alpha
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.enabled = True
        self.merged = False
        self._backup: torch.Tensor | None = None  # original weight while merged (non-fp32 weights)
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    def extra_repr(self) -> str:
        split = f", split={self.split_dims}" if self.split_dims else ""
        return f"{self.lora_name}, rank={self.rank}, alpha={self.alpha:g}{split}"

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA contribution to the output, or None when it contributes nothing this call."""
        # Multiplier 0 skips the work at inference; in training the (zero) contribution stays in the graph so
        # a batch of a network_multiplier = 0 dataset still backpropagates (zero gradients), as in kohya.
        if not self.enabled or self.merged or (self.multiplier == 0 and not self.training):
            return None
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        scale = self.scale * self.multiplier
        if self.training and self.rank_dropout:
            scale = scale / (1.0 - self.rank_dropout)
        downs = self.lora_down if self.split_dims else [self.lora_down]
        ups = self.lora_up if self.split_dims else [self.lora_up]
        # Under autocast the matmuls cast their inputs themselves; an explicit cast to the (fp32) LoRA dtype
        # would only add a full copy of every activation (measured: 6.6% of an eager 1024² step).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down[0].weight.dtype if self.split_dims else self.lora_down.weight.dtype)
        outs = [up(self._drop(down(x))) for down, up in zip(downs, ups)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out * scale

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        if self.dropout:
            h = nn.functional.dropout(h, p=self.dropout)
        if self.rank_dropout:
            # one Bernoulli mask per (sample, rank channel), broadcast over the token axis
            shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],)
            h = h * (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
        return h

    def lora_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(down params, up params): LoRA+ gives the up params a larger learning rate."""
        return list(self.lora_down.parameters()), list(self.lora_up.parameters())

    # -- the file form ---------------------------------------------------------------------------------
    def to_weight(self) -> LoRAWeight:
        """The module as one fused LoRA (what every loader applies: alpha / rank_fused · up @ down).

        split_qkv parts are fused block-diagonally with alpha × n, so the fused scale equals the trained
        one (kohya keeps alpha unchanged here and its files load 3-4× too weak: sd-scripts#2204).
        """
        if not self.split_dims:
            return LoRAWeight(self.lora_down.weight.detach(), self.lora_up.weight.detach(), float(self.alpha))
        parts = {i: LoRAWeight(d.weight.detach(), u.weight.detach(), float(self.alpha))
                 for i, (d, u) in enumerate(zip(self.lora_down, self.lora_up))}
        return fuse_parts(parts, self.split_dims)

    @torch.no_grad()
    def load_weight(self, w: LoRAWeight) -> None:
        """Load a fused LoRA; a split module takes its parts back (the file's scale becomes this alpha)."""
        if not self.split_dims:
            self._check(w.down.shape, self.lora_down.weight.shape, w.up.shape, self.lora_up.weight.shape)
            self.lora_down.weight.copy_(w.down)
            self.lora_up.weight.copy_(w.up)
            self.alpha = float(w.rank if w.alpha is None else w.alpha)
            self.scale = self.alpha / self.rank
            return
        n, r = len(self.split_dims), self.rank
        offs = [sum(self.split_dims[:i]) for i in range(n)]
        blocks = [w.up[o: o + d] for o, d in zip(offs, self.split_dims)]
        # our (and kohya's) split_qkv files: rank n·r, part i uses columns [i·r, (i+1)·r), zeros elsewhere
        if w.rank != n * r or any(
                (b[:, :i * r] != 0).any() or (b[:, (i + 1) * r:] != 0).any() for i, b in enumerate(blocks)):
            raise ValueError(f"{self.lora_name}: the file's LoRA (rank {w.rank}) is not {n} block-diagonal "
                             f"parts of rank {r}; load it without split_qkv")
        ratio = w.scale / self.scale  # keep ΔW when the file's scale differs from this module's
        for i, (d, u) in enumerate(zip(self.lora_down, self.lora_up)):
            self._check(w.down[i * r:(i + 1) * r].shape, d.weight.shape, blocks[i][:, i * r:(i + 1) * r].shape,
                        u.weight.shape)
            d.weight.copy_(w.down[i * r:(i + 1) * r])
            u.weight.copy_(blocks[i][:, i * r:(i + 1) * r].float() * ratio)

    def _check(self, ds, dt, us, ut) -> None:
        if tuple(ds) != tuple(dt) or tuple(us) != tuple(ut):
            raise ValueError(f"{self.lora_name}: file shapes down {list(ds)} up {list(us)} do not match the "
                             f"module's down {list(dt)} up {list(ut)}")

    def delta_weight(self) -> torch.Tensor:
        """multiplier · ΔW in float32, [out, in]."""
        return self.to_weight().delta() * self.multiplier


class LoRAModule(nn.Module):
    """A frozen Linear plus a LoRA: `forward(x) = base(x) + lora(x)`."""

    def __init__(self, base: nn.Module, lora: LoRAAdapter):
        super().__init__()
        self.base = base
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.lora(x)
        return y if d is None else y + d.to(y.dtype)

    @property
    def linear(self) -> nn.Linear:
        """The innermost Linear (several LoRAs may be stacked)."""
        m = self.base
        while isinstance(m, LoRAModule):
            m = m.base
        return m

    # Code that reads a Linear's attributes keeps working on the wrapped layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features


@torch.no_grad()
def add_to_weight(linear: nn.Linear, delta: torch.Tensor) -> None:
    """W += delta, computed in float32 and stored back in W's dtype (fp8 saturating, as the model's)."""
    w = linear.weight
    new = w.detach().float() + delta.to(w.device)
    if w.dtype == torch.float8_e4m3fn:
        w.data = to_fp8(new)
    else:
        w.data = new.to(w.dtype)
