"""library/flow.py against its formulas and against diffusers' flow-match scheduler (a reference)."""

from __future__ import annotations

import math

import pytest
import torch

from library import flow


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uniform_and_sigmoid_match_their_draws() -> None:
    assert torch.equal(flow.sample_sigmas("uniform", 7, gen(), latent_hw=(8, 8)), torch.rand(7, generator=gen()))
    expected = torch.sigmoid(1.7 * torch.randn(7, generator=gen()))
    got = flow.sample_sigmas("sigmoid", 7, gen(), latent_hw=(8, 8), sigmoid_scale=1.7)
    torch.testing.assert_close(got, expected)


def test_shift_formula_and_identity_at_shift_one() -> None:
    s = torch.sigmoid(torch.randn(9, generator=gen(1)))
    got = flow.sample_sigmas("shift", 9, gen(1), latent_hw=(8, 8), discrete_flow_shift=3.0)
    torch.testing.assert_close(got, 3.0 * s / (1.0 + 2.0 * s))
    same = flow.sample_sigmas("shift", 9, gen(1), latent_hw=(8, 8), discrete_flow_shift=1.0)
    torch.testing.assert_close(same, s)
    assert bool((got >= s).all()), "shift > 1 moves every sigma towards noise"


def test_flux_shift_matches_diffusers_mu_and_time_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for h, w in [(64, 64), (128, 128), (96, 64)]:
        seq = (h // 2) * (w // 2)
        assert flow.flux_mu(seq) == pytest.approx(calculate_shift(seq), rel=1e-12)
    s = torch.sigmoid(torch.randn(5, generator=gen(2)))
    got = flow.sample_sigmas("flux_shift", 5, gen(2), latent_hw=(128, 128))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    torch.testing.assert_close(got, sched.time_shift(1.15, 1.0, s).float())


def test_sigma_sampler_uses_the_shifted_discrete_grid_of_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(flow.discrete_sigmas(3.0), ref.sigmas[:1000].float())
    u = torch.rand(6, generator=gen(3))
    got = flow.sample_sigmas("sigma", 6, gen(3), latent_hw=(8, 8), discrete_flow_shift=3.0)
    torch.testing.assert_close(got, ref.sigmas[(u * 1000).long()].float())


def test_density_logit_normal_and_mode() -> None:
    z = torch.randn(5, generator=gen(4))
    got = flow.density_u("logit_normal", 5, gen(4), logit_mean=0.3, logit_std=0.7)
    torch.testing.assert_close(got, torch.sigmoid(z * 0.7 + 0.3))
    u = torch.rand(5, generator=gen(5))
    got = flow.density_u("mode", 5, gen(5), mode_scale=1.29)
    torch.testing.assert_close(got, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))


@pytest.mark.parametrize("method", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_every_sampler_is_in_unit_interval_and_seeded(method: str) -> None:
    a = flow.sample_sigmas(method, 256, gen(7), latent_hw=(64, 64), weighting_scheme="logit_normal")
    b = flow.sample_sigmas(method, 256, gen(7), latent_hw=(64, 64), weighting_scheme="logit_normal")
    assert torch.equal(a, b) and a.shape == (256,)
    assert bool(((a >= 0) & (a <= 1)).all())


def test_noisy_input_endpoints_and_velocity() -> None:
    x0, n = torch.randn(2, 16, 4, 4, generator=gen(8)), torch.randn(2, 16, 4, 4, generator=gen(9))
    xt = flow.noisy_input(x0, n, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], n[1])
    # d x_t / d sigma is the velocity target
    s, eps = torch.tensor([0.3, 0.6]), 1e-3
    fd = (flow.noisy_input(x0, n, s + eps) - flow.noisy_input(x0, n, s)) / eps
    torch.testing.assert_close(fd, flow.velocity_target(x0, n), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["raw", "additive", "sigma_scaled"])
def test_prediction_types_compare_in_the_same_space(kind: str) -> None:
    x0, n = torch.randn(3, 16, 4, 4, generator=gen(10)), torch.randn(3, 16, 4, 4, generator=gen(11))
    s = torch.tensor([0.2, 0.5, 0.9])
    xt = flow.noisy_input(x0, n, s)
    perfect = n - x0
    p, t = flow.prediction_and_target(kind, perfect, xt, x0, n, s)
    # a perfect velocity prediction has zero loss in every space (kohya's sigma_scaled/additive fail this)
    torch.testing.assert_close(p, t, atol=1e-5, rtol=1e-5)
    wrong = perfect + 0.1
    p, t = flow.prediction_and_target(kind, wrong, xt, x0, n, s)
    if kind == "raw":
        torch.testing.assert_close(p - t, torch.full_like(p, 0.1))
    if kind == "additive":
        torch.testing.assert_close(p, xt + wrong)
    if kind == "sigma_scaled":
        torch.testing.assert_close(t, x0, atol=1e-5, rtol=1e-5)  # the target is x0 itself
        torch.testing.assert_close(p, xt - s.view(-1, 1, 1, 1) * wrong)


def test_sigma_sqrt_weighting_turns_x0_loss_back_into_velocity_loss() -> None:
    x0, n = torch.randn(3, 16, 4, 4, generator=gen(12)), torch.randn(3, 16, 4, 4, generator=gen(13))
    pred = torch.randn(3, 16, 4, 4, generator=gen(14))
    s = torch.tensor([0.2, 0.5, 0.9])
    xt = flow.noisy_input(x0, n, s)
    p, t = flow.prediction_and_target("sigma_scaled", pred, xt, x0, n, s)
    weighted = flow.reduce_loss(flow.elementwise_loss(p, t, "l2"), flow.loss_weighting("sigma_sqrt", s))
    raw = flow.reduce_loss(flow.elementwise_loss(pred, n - x0, "l2"))
    torch.testing.assert_close(weighted, raw, atol=1e-4, rtol=1e-4)
    cos = flow.loss_weighting("cosmap", s)
    torch.testing.assert_close(cos, 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert torch.equal(flow.loss_weighting("logit_normal", s), torch.ones(3))


def test_losses_match_their_formulas_and_limits() -> None:
    p, t = torch.randn(2, 4, 3, 3, generator=gen(15)), torch.randn(2, 4, 3, 3, generator=gen(16))
    c = torch.tensor([0.1, 0.5])
    d, cc = p - t, c.view(-1, 1, 1, 1)
    torch.testing.assert_close(flow.elementwise_loss(p, t, "l2"), d**2)
    torch.testing.assert_close(flow.elementwise_loss(p, t, "l1"), d.abs())
    torch.testing.assert_close(flow.elementwise_loss(p, t, "huber", c), 2 * cc * (torch.sqrt(d**2 + cc**2) - cc))
    torch.testing.assert_close(flow.elementwise_loss(p, t, "smooth_l1", c), 2 * (torch.sqrt(d**2 + cc**2) - cc))
    tiny = torch.full((1, 1, 1, 1), 1e-2)
    huber_small = flow.elementwise_loss(tiny, torch.zeros_like(tiny), "huber", torch.tensor([1.0]))
    assert huber_small.item() == pytest.approx(1e-4, rel=3e-3)  # quadratic near 0
    big = torch.full((1, 1, 1, 1), 100.0)
    huber_big = flow.elementwise_loss(big, torch.zeros_like(big), "huber", torch.tensor([0.1]))
    assert huber_big.item() == pytest.approx(2 * 0.1 * 100, rel=2e-3)  # linear far away


def test_huber_schedules() -> None:
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(flow.huber_c_for("constant", 0.1, 2.0, s), torch.full((3,), 0.2))
    exp = flow.huber_c_for("exponential", 0.1, 1.0, s)
    torch.testing.assert_close(exp, torch.tensor([1.0, 0.1**0.5, 0.1]))
    snr = flow.huber_c_for("snr", 0.1, 1.0, s)
    torch.testing.assert_close(snr, torch.tensor([1.0, 0.9 * 0.25 + 0.1, 0.1]))


def test_input_perturbation() -> None:
    n = torch.zeros(4, 16, 8, 8)
    assert flow.perturb_noise(n, None, False, gen()) is n
    out = flow.perturb_noise(n, 0.1, False, gen(17))
    assert out.std().item() == pytest.approx(0.1, rel=0.1)
    rnd = flow.perturb_noise(n, 0.1, True, gen(17))
    assert rnd.abs().max() < out.abs().max() * 1.5 and not torch.equal(rnd, out)


def test_reduce_loss_mask_and_prior_weights() -> None:
    loss = torch.ones(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0
    assert flow.reduce_loss(loss, mask=mask).item() == pytest.approx(0.5)
    w = torch.tensor([1.0, 0.0])
    weighted = flow.reduce_loss(loss * torch.tensor([2.0, 4.0]).view(2, 1, 1, 1), sample_weights=w)
    assert weighted.item() == pytest.approx(1.0)
    m = flow.resize_mask(torch.ones(2, 32, 32), (4, 4))
    assert m.shape == (2, 1, 4, 4) and torch.equal(m, torch.ones_like(m))
