"""FLUX building blocks, named as in the Black Forest Labs reference so checkpoint keys map 1:1.

A double-stream block keeps separate weights for image and text tokens and attends jointly over both
(MMDiT, Esser et al. 2024, "Scaling Rectified Flow Transformers"); a single-stream block runs attention and
the MLP in parallel over the joint sequence (ViT-22B style). Both are conditioned through adaLN modulation
(shift, scale, gate) computed from the vector `vec` (timestep + guidance + pooled CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from library.flux.math import AXES_DIM, THETA, attention, rope_freqs


class EmbedND(nn.Module):
    """Position ids [B, L, n_axes] -> RoPE (cos, sin) table [B, 1, L, D/2, 2]; no parameters."""

    def __init__(self, axes_dim: tuple[int, ...] = AXES_DIM, theta: int = THETA):
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return rope_freqs(ids, self.axes_dim, self.theta)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) with a learned `scale`, accumulated in float32.

    `F.rms_norm` is one fused kernel on CUDA (float32 accumulation) where the BFL formulation
    (upcast, square, mean, rsqrt, multiply, downcast, scale) is seven passes; the two differ by bf16 rounding
    only (the normalised value is not rounded to bf16 before the scale multiplies it)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys, which keeps attention logits bounded."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """The qkv / QK-norm / output projection of one stream; the attention itself is joint (see blocks)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> normalised q, k and v, each [B, H, L, D]."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """adaLN: (1 + scale) * x + shift, as one fused multiply-add over x."""
        return torch.addcmul(self.shift, x, 1 + self.scale)

    def gated(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + gate * x, as one fused multiply-add (one pass instead of two, no rounded product)."""
        return torch.addcmul(residual, self.gate, x)


class Modulation(nn.Module):
    """vec [B, dim] -> one (double=False) or two (double=True) sets of shift/scale/gate, each [B, 1, dim]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        chunks = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*chunks[:3])
        return first, (ModulationOut(*chunks[3:]) if self.is_double else None)


def _mlp(dim: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, dim, bias=True))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_ratio)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_ratio)
        self.attn_backend = "sdpa"

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.split_heads(img_mod1.apply(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.split_heads(txt_mod1.apply(self.txt_norm1(txt)))

        # Joint attention over [txt; img] (the ids / pe are concatenated in the same order).
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe, mask, self.attn_backend)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img_mod1.gated(img, self.img_attn.proj(img_attn))
        img = img_mod2.gated(img, self.img_mlp(img_mod2.apply(self.img_norm2(img))))
        txt = txt_mod1.gated(txt, self.txt_attn.proj(txt_attn))
        txt = txt_mod2.gated(txt, self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """linear1 = [qkv | mlp_in], linear2 = [proj | mlp_out]: attention and MLP run in parallel."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)
        self.attn_backend = "sdpa"

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.apply(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, mask, self.attn_backend)
        return mod.gated(x, self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = torch.addcmul(shift[:, None, :], self.norm_final(x), 1 + scale[:, None, :])
        return self.linear(x)
