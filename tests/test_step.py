"""library/train/step.py: per-sample noise, the flow-matching loss (masks, prior weights, prediction
spaces) and Kontext reference tokens."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from library.flux.loading import load_transformer
from library.train.cli import parse_args
from library.train.config import build_config
from library.train.step import StepInputs, draw_noise_and_sigmas, flow_matching_loss, sample_keys


def test_noise_depends_on_the_sample_not_on_the_batch() -> None:
    obj = build_config(parse_args(["--timestep_sampling", "sigmoid"])).objective
    lat = torch.zeros(3, 16, 4, 4)
    keys = sample_keys(["a.png", "b.png", "a.png"])
    assert keys == ("a.png#0", "b.png#0", "a.png#1")
    n, n_in, s = draw_noise_and_sigmas(obj, lat, keys, seed=1, step=7)
    n2, _, s2 = draw_noise_and_sigmas(obj, lat[1:2], keys[1:2], seed=1, step=7)
    assert torch.equal(n[1:2], n2) and torch.equal(s[1:2], s2)
    assert not torch.equal(n[0], n[2]) and torch.equal(n, n_in)  # no input perturbation without ip_noise_gamma
    n3, _, _ = draw_noise_and_sigmas(obj, lat, keys, seed=1, step=8)
    assert not torch.equal(n, n3)


def test_step_loss_masks_prior_weights_and_prediction_spaces(tiny_ckpts) -> None:
    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    p = model.params
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 16, 4, 4, generator=g)
    t5, pooled = torch.randn(2, 8, p.context_in_dim, generator=g), torch.randn(2, p.vec_in_dim, generator=g)

    def loss(*argv: str, idx=(0, 1), weights=(1.0, 1.0), mask=None) -> float:
        obj = build_config(parse_args(list(argv))).objective
        i = list(idx)
        x = StepInputs(lat[i], t5[i], pooled[i], torch.ones(len(i), 8), torch.tensor(weights), mask,
                       tuple(("a#0", "b#0")[k] for k in i))
        with torch.no_grad():
            return float(flow_matching_loss(model, x, obj, 1, 5, True, False, nullcontext))

    raw = ("--model_prediction_type", "raw")
    both = loss(*raw)
    assert loss(*raw, mask=torch.zeros(2, 1, 4, 4)) == 0.0
    assert loss(*raw, mask=torch.ones(2, 1, 4, 4)) == pytest.approx(both, rel=1e-6)
    only_a = loss(*raw, idx=(0,), weights=(1.0,))
    assert 2 * loss(*raw, weights=(1.0, 0.0)) == pytest.approx(only_a, rel=1e-5)  # prior weight 0 drops b
    # sigma_scaled with sigma_sqrt weighting is the velocity loss again: the spaces match in the trainer too
    scaled = loss("--model_prediction_type", "sigma_scaled", "--weighting_scheme", "sigma_sqrt")
    raw_same_sigma = loss(*raw, "--weighting_scheme", "sigma_sqrt")
    assert scaled == pytest.approx(raw_same_sigma, rel=1e-4)


def test_kontext_reference_tokens_reach_the_model(tiny_ckpts) -> None:
    """Control-subset batches: the clean reference latents go in as extra tokens with first id axis 1."""
    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    p = model.params
    g = torch.Generator().manual_seed(0)
    lat, ref = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 6, 4, generator=g)
    t5, pooled = torch.randn(1, 8, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    seen = {}
    forward = model.forward

    def spy(**kw):
        seen.update(cond=kw["cond"], cond_ids=kw["cond_ids"])
        return forward(**kw)

    model.forward = spy
    obj = build_config(parse_args(["--model_prediction_type", "raw"])).objective

    def loss(cond):
        x = StepInputs(lat, t5, pooled, torch.ones(1, 8), torch.ones(1), None, ("a#0",), cond_latents=cond)
        with torch.no_grad():
            return float(flow_matching_loss(model, x, obj, 1, 5, True, False, nullcontext))

    plain = loss(None)
    assert seen["cond"] is None
    with_ref = loss(ref)
    assert seen["cond"].shape == (1, 6, 64)  # (6/2)*(4/2) tokens of 16*2*2 channels
    assert seen["cond_ids"][0, :, 0].eq(1).all() and seen["cond_ids"][0, -1, 1:].tolist() == [2.0, 1.0]
    assert abs(with_ref - plain) > 1e-4 * plain  # the reference changes the prediction
    assert loss(ref * 0.5) != pytest.approx(with_ref, rel=1e-6)
