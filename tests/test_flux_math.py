"""The pure numerics of library.flux.math, each against an independent formulation or diffusers."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.flux import math as fm


def test_constants():
    assert fm.HEAD_DIM == 128 and sum(fm.AXES_DIM) == fm.HEAD_DIM and fm.THETA == 10_000


def test_pack_unpack_round_trip_and_layout():
    z = torch.randn(2, 16, 6, 10)
    x = fm.pack_latents(z)
    assert x.shape == (2, 15, 64)
    assert torch.equal(fm.unpack_latents(x, 6, 10), z)
    # Token (row 1, col 2) holds the 2x2 patch z[:, :, 2:4, 4:6], channel-major.
    assert torch.equal(x[:, 1 * 5 + 2].reshape(2, 16, 2, 2), z[:, :, 2:4, 4:6])


def test_pack_matches_diffusers():
    from diffusers import FluxPipeline

    z = torch.randn(1, 16, 8, 12)
    ours = fm.pack_latents(z)
    assert torch.equal(ours, FluxPipeline._pack_latents(z, 1, 16, 8, 12))
    # diffusers' _unpack_latents takes the image size (vae_scale_factor 8).
    assert torch.equal(fm.unpack_latents(ours, 8, 12), FluxPipeline._unpack_latents(ours, 64, 96, 8))


def test_ids():
    ids = fm.make_img_ids(2, 3, 4, index=1)
    assert ids.shape == (2, 12, 3) and ids.dtype == torch.float32
    assert ids[0, 7].tolist() == [1.0, 1.0, 3.0]  # token 7 = row 1, col 3
    assert torch.equal(ids[0, :, 1:], fm.make_img_ids(1, 3, 4)[0, :, 1:])
    assert (fm.make_img_ids(1, 3, 4)[..., 0] == 0).all()
    assert torch.equal(fm.make_txt_ids(2, 5), torch.zeros(2, 5, 3))


def test_img_ids_match_diffusers():
    from diffusers import FluxPipeline

    ref = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    assert torch.equal(fm.make_img_ids(1, 3, 4)[0], ref)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.25, 0.999])
    ref = get_timestep_embedding(t * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(fm.timestep_embedding(t, 256), ref, atol=1e-5)


def test_rope_is_complex_rotation():
    """apply_rope == multiplying consecutive pairs, read as complex numbers, by exp(i * pos * omega)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([fm.make_txt_ids(1, 2), fm.make_img_ids(1, 2, 3, index=1)], dim=1)
    q = torch.randn(1, 2, ids.shape[1], fm.HEAD_DIM, generator=gen)
    omegas = torch.cat([1.0 / fm.THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in fm.AXES_DIM])
    axis = torch.cat([torch.full((d // 2,), i) for i, d in enumerate(fm.AXES_DIM)])
    angles = ids[0][:, axis].double() * omegas  # [L, 64]
    qc = torch.view_as_complex(q.double().reshape(1, 2, -1, 64, 2))
    ref = torch.view_as_real(qc * torch.polar(torch.ones_like(angles), angles)).reshape(q.shape).float()
    out = fm.apply_rope(q, fm.rope_freqs(ids))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out[:, :, :2], q[:, :, :2])  # text tokens (ids 0) are not rotated
    assert not torch.allclose(out[:, :, 3:], q[:, :, 3:], atol=1e-2)


def test_rope_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = fm.make_img_ids(1, 4, 5, index=1)
    q = torch.randn(1, 2, 20, fm.HEAD_DIM)
    cos, sin = FluxPosEmbed(fm.THETA, list(fm.AXES_DIM))(ids[0])
    ref = apply_rotary_emb(q, (cos, sin))
    assert torch.allclose(fm.apply_rope(q, fm.rope_freqs(ids)), ref, atol=1e-5)


def test_attention_mask_hides_padded_text_keys():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, fm.HEAD_DIM, generator=gen) for _ in range(3))
    freqs = fm.rope_freqs(torch.zeros(1, 6, 3))
    mask = fm.key_padding_mask(torch.tensor([[True, True, False]]), n_img=3)
    assert mask.shape == (1, 1, 1, 6) and mask[0, 0, 0].tolist() == [True, True, False, True, True, True]
    out = fm.attention(q, k, v, freqs, mask)
    keep = [0, 1, 3, 4, 5]
    # Reference: attention over the kept keys only (identity rotation: all ids are zero).
    w = torch.softmax(q @ k[:, :, keep].transpose(-1, -2) / fm.HEAD_DIM ** 0.5, dim=-1)
    ref = (w @ v[:, :, keep]).transpose(1, 2).reshape(1, 6, -1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(fm.attention(q, k, v, freqs), ref, atol=1e-3)


def test_xformers_missing_is_a_user_error():
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers is not installed"):
            fm.import_xformers()
    else:
        pytest.skip("xformers is installed")
