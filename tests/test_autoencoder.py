"""The FLUX AE against diffusers' AutoencoderKL on the same tiny weights."""

from __future__ import annotations

import pytest
import torch

from library.flux.autoencoder import SCALE, SHIFT, AutoEncoderParams
from library.flux.convert import ae_bfl_to_diffusers, ae_diffusers_to_bfl
from library.flux.loading import load_autoencoder
from library.flux.safetensors_io import open_checkpoint
from library.flux.tiny import TINY_AE

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def aes(tiny_ckpts):
    from diffusers import AutoencoderKL

    ours = load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32).eval()
    theirs = AutoencoderKL.from_pretrained(tiny_ckpts.diffusers, subfolder="vae", torch_dtype=torch.float32).eval()
    return ours, theirs


def _images(seed: int = 0) -> torch.Tensor:
    # Non-square, and not a multiple of 16 in height: exercises the asymmetric downsampling padding.
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_encode_matches_diffusers(aes):
    ours, theirs = aes
    x = _images()
    z = ours.encode(x)
    assert z.shape == (2, 16, 5, 7)
    ref = (theirs.encode(x).latent_dist.mean - theirs.config.shift_factor) * theirs.config.scaling_factor
    assert ref.std() > 0.05
    assert rel_err(z, ref) <= TOL


@torch.no_grad()
def test_decode_matches_diffusers(aes):
    ours, theirs = aes
    z = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(1))
    ref = theirs.decode(z / theirs.config.scaling_factor + theirs.config.shift_factor).sample
    out = ours.decode(z)
    assert out.shape == (2, 3, 40, 56) and ref.std() > 0.05
    assert rel_err(out, ref) <= TOL
    assert rel_err(ours.decode(z + 0.3), ref) > 1e-2  # the comparison can fail


@torch.no_grad()
def test_sampling_uses_the_generator(aes):
    ours, theirs = aes
    x = _images()
    a = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    b = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    c = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, ours.encode(x))
    # Same draw as diffusers' DiagonalGaussianDistribution.sample with the same generator.
    ref = theirs.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert rel_err(a, (ref - SHIFT) * SCALE) <= TOL


def test_params_read_from_shapes(tiny_ckpts):
    with open_checkpoint(tiny_ckpts.ae) as ckpt:
        assert AutoEncoderParams.from_shapes(ckpt.shapes) == TINY_AE
    # FLUX.1's real AE: ch 128, (1, 2, 4, 4), 2 res blocks.
    real = AutoEncoderParams(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)
    from library.flux.autoencoder import AutoEncoder

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoEncoder(real).state_dict().items()}
    assert AutoEncoderParams.from_shapes(shapes) == real
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 83_819_683  # the real ae.safetensors' size


def test_bfl_diffusers_round_trip_is_exact(tiny_ckpts):
    with open_checkpoint(tiny_ckpts.ae) as ckpt:
        sd = ckpt.state_dict()
    dif = ae_bfl_to_diffusers(sd)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in dif
    assert dif["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    back = ae_diffusers_to_bfl(dif)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_latent_scale_and_shift_are_flux1s():
    # Literal values of FLUX.1's vae/config.json (scaling_factor, shift_factor) and BFL's AutoEncoderParams.
    # The parity tests above cannot see a wrong constant: the tiny diffusers config is written from SCALE/SHIFT.
    assert (SCALE, SHIFT) == (0.3611, 0.1159)
