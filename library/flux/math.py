"""Pure numerics of the FLUX transformer: timestep embedding, RoPE, attention, latent packing, position ids.

Everything here is a function of its tensor arguments only (no modules, no state), so each formula exists
once and is tested directly. Shapes use B = batch, H = heads, L = tokens, D = head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from library.errors import UserError
from library.flux.geometry import PATCH

HEAD_DIM = 128  # FLUX's attention head width; heads = hidden / HEAD_DIM
AXES_DIM = (16, 56, 56)  # RoPE frequencies per id axis (index, row, column); sums to HEAD_DIM
THETA = 10_000  # RoPE base
TIME_FACTOR = 1000.0  # timesteps in [0, 1] are embedded as t * 1000 (BFL `timestep_embedding`)
ATTN_BACKENDS = ("sdpa", "xformers")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0,
                       time_factor: float = TIME_FACTOR) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of scalars t [B] (DDPM / "Attention is all you need"), cos half first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope_freqs(ids: torch.Tensor, axes_dim: tuple[int, ...] = AXES_DIM, theta: int = THETA) -> torch.Tensor:
    """Rotary angles for multi-axis position ids [B, L, n_axes] -> [B, 1, L, sum(axes)/2, 2] of (cos, sin).

    Axis a contributes axes_dim[a]/2 frequencies theta^(-2k/axes_dim[a]) (RoFormer, Su et al. 2021); the
    angles are computed in float64 so large positions keep their precision, then stored as float32.
    """
    parts = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        parts.append(ids[..., axis].to(torch.float64)[..., None] * omega)
    angles = torch.cat(parts, dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()[:, None]


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2k], x[2k+1]) of x [B, H, L, D] by the angles in `freqs` (see rope_freqs).

    out[2k] = x[2k] cos - x[2k+1] sin,  out[2k+1] = x[2k] sin + x[2k+1] cos, computed in float32. Written
    as one multiply and one multiply-add over the pair axis, (cos, sin) * x[2k] + (-sin, cos) * x[2k+1]
    (the float32 tables promote a bf16 x without a separate cast), instead of unbinding and re-stacking the
    pairs: 3 passes over the big tensor in eager mode instead of 9 (einops: "b h l (d two) -> b h l d two").
    """
    cos, sin = freqs.unbind(-1)
    turned = torch.stack((-sin, cos), dim=-1)  # [B, 1, L, D/2, 2], as small as freqs
    pairs = x.unflatten(-1, (-1, 2))
    out = torch.addcmul(freqs * pairs[..., :1], turned, pairs[..., 1:])
    return out.flatten(-2).type_as(x)


def key_padding_mask(txt_mask: torch.Tensor, n_img: int) -> torch.Tensor:
    """Boolean key mask [B, 1, 1, S+L] from a text mask [B, S] (True = real token); image keys are all valid.

    This is kohya's --apply_t5_attn_mask: padded T5 tokens are hidden as keys from every query.
    """
    img = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([txt_mask.bool(), img], dim=1)[:, None, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor,
              mask: torch.Tensor | None = None, backend: str = "sdpa") -> torch.Tensor:
    """RoPE + scaled dot-product attention: q, k, v [B, H, L, D] -> [B, L, H*D].

    `mask` is a boolean [B, 1, 1 or L, L] (True = attend). `backend` is "sdpa" (torch) or "xformers".
    """
    q, k = apply_rope(q, freqs), apply_rope(k, freqs)
    if backend == "xformers":
        out = _xformers_attention(q, k, v, mask)
        return rearrange(out, "b l h d -> b l (h d)")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "b h l d -> b l (h d)")


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    xops = import_xformers()
    bias = None
    if mask is not None:
        # xformers takes an additive bias of the full [B, H, Lq, Lk] shape.
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        bias = torch.zeros(b, h, lq, lk, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask.expand(b, h, lq, lk), float("-inf"))
    layout = "b h l d -> b l h d"
    return xops.memory_efficient_attention(rearrange(q, layout), rearrange(k, layout), rearrange(v, layout),
                                           attn_bias=bias)


def import_xformers():
    """The xformers.ops module, or a UserError saying how to get it."""
    try:
        import xformers.ops as xops
    except ImportError:
        raise UserError("attention backend 'xformers' was asked for but xformers is not installed; "
                        "install it or use the default sdpa backend") from None
    return xops


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, H, W] -> tokens [B, (H/2)(W/2), C*4]: each 2x2 patch becomes one token."""
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents; `height`, `width` are the latent size (H, W), i.e. image size / 8."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // PATCH, w=width // PATCH, ph=PATCH,
                     pw=PATCH)


def make_img_ids(batch: int, h: int, w: int, index: int = 0) -> torch.Tensor:
    """Position ids [B, h*w, 3] of a packed latent grid of h x w tokens (latent size / 2): (index, row, col).

    `index` is the first axis: 0 for the generated image, 1 for FLUX.1 Kontext reference-image tokens.
    """
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def make_txt_ids(batch: int, s: int) -> torch.Tensor:
    """Text position ids [B, s, 3]: all zero, text tokens get no positional rotation."""
    return torch.zeros(batch, s, 3)
