"""The FLUX autoencoder (a KL-regularised conv VAE, Rombach et al. 2022) with the BFL parameter names.

16 latent channels, downsampling 2^(levels-1) = 8 for FLUX. `encode` returns the latents the transformer
sees, `(z - SHIFT) * SCALE`; `decode` inverts that. Sizes (`AutoEncoderParams`) are read from shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from library.errors import UserError

SCALE = 0.3611  # FLUX latent scale factor
SHIFT = 0.1159  # FLUX latent shift factor
GROUPS = 32  # GroupNorm groups everywhere in the AE


@dataclass(frozen=True)
class AutoEncoderParams:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    in_channels: int = 3
    out_ch: int = 3

    @staticmethod
    def from_shapes(shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> "AutoEncoderParams":
        need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"]
        missing = [k for k in need if k not in shapes]
        if missing:
            raise UserError(f"{name}: not a FLUX autoencoder: missing {', '.join(missing)}")
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        blocks = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.{blocks - 1}.conv2.weight"][0] // ch for i in range(levels))
        return AutoEncoderParams(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
                                 z_channels=shapes["decoder.conv_in.weight"][1], in_channels=in_channels,
                                 out_ch=shapes.get("decoder.conv_out.weight", (3,))[0])


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only), as the original LDM implementation.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample`/`upsample`."""


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(p.ch_mult):
            level = _Level()
            block_in, block_out = p.ch * in_mult[i], p.ch * mult
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(p.num_res_blocks))
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        top = p.ch * p.ch_mult[-1]
        self.mid = _Mid(top)
        self.norm_out = _norm(top)
        self.conv_out = nn.Conv2d(top, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        top = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, top, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(top)
        # up[i] is the level at resolution i (as in the encoder); it runs from the last level to the first.
        levels: list[_Level] = []
        block_in = top
        for i in reversed(range(len(p.ch_mult))):
            level = _Level()
            block_out = p.ch * p.ch_mult[i]
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(p.num_res_blocks + 1))
            block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = SCALE
        self.shift_factor = SHIFT

    def encode(self, x: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled, shifted latents [B, z, H/8, W/8].

        `sample=False` takes the posterior mean; `sample=True` draws mean + std * noise with `generator`
        (noise drawn on the generator's device, then moved).
        """
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype)
            z = mean + std * noise.to(mean.device)
        return (z - self.shift_factor) * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled, shifted latents -> images in (about) [-1, 1]."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device
