"""The two edit-pair objectives against their formulas (library/flow.py, library/train/step.py) and the
objective's round trip through the LoRA metadata (library/objective.py)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from library import flow
from library.errors import UserError
from library.flux.math import pack_latents, unpack_latents
from library.objective import Objective, objective_of_loras, objective_of_training
from library.train.cli import parse_args
from library.train.config import build_config
from library.train.step import StepInputs, draw_noise_and_sigmas, flow_matching_loss

B, H, W, S, CTX, VEC = 2, 4, 6, 8, 32, 16


class Oracle(torch.nn.Module):
    """A stand-in transformer that returns a fixed velocity and records what it was given."""

    def __init__(self, velocity: torch.Tensor) -> None:
        super().__init__()
        self.velocity, self.seen = velocity, {}

    def forward(self, **kw):
        self.seen = kw
        return pack_latents(self.velocity)


def inputs(cond: bool = True) -> StepInputs:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(B, 16, H, W, generator=g)
    ctl = torch.randn(B, 16, H, W, generator=g) if cond else None
    return StepInputs(lat, torch.randn(B, S, CTX, generator=g), torch.randn(B, VEC, generator=g), torch.ones(B, S),
                      torch.ones(B), None, ("a#0", "b#0"), cond_latents=ctl)


def objective(*flags: str):
    return build_config(parse_args(["--timestep_sampling", "sigmoid", *flags])).objective


def expected(x: StepInputs, obj, seed: int = 3, step: int = 5):
    """(x_σ, v, σ) written out from the formulas: x_σ = (1 − σ)·target + σ·e, v = e − target."""
    noise, _, sigmas = draw_noise_and_sigmas(obj, x.latents, x.keys, seed, step)
    e = x.cond_latents + obj.control_noise_std * noise if obj.flow_from_control else noise
    s = sigmas.view(-1, 1, 1, 1)
    return (1 - s) * x.latents + s * e, e - x.latents, sigmas


@pytest.mark.parametrize("flags", [(), ("--flow_from_control",), ("--flow_from_control", "--control_noise_std", "0.3")])
@pytest.mark.parametrize("kind", ["raw", "additive", "sigma_scaled"])
def test_each_objective_is_zero_exactly_for_its_own_velocity(flags, kind) -> None:
    x, obj = inputs(), objective("--model_prediction_type", kind, *flags)
    noisy, v, sigmas = expected(x, obj)
    model = Oracle(v)
    loss = flow_matching_loss(model, x, obj, 3, 5, False, False, nullcontext)
    assert float(loss) < 1e-10
    torch.testing.assert_close(unpack_latents(model.seen["img"], H, W), noisy)  # the input x_σ
    torch.testing.assert_close(model.seen["timesteps"], sigmas)  # σ is also the model's time input
    # negative control: the other objective's velocity is not a minimiser
    other = objective("--model_prediction_type", kind, *(() if flags else ("--flow_from_control",)))
    _, v_other, _ = expected(x, other)
    assert float(flow_matching_loss(Oracle(v_other), x, obj, 3, 5, False, False, nullcontext)) > 1e-2


def test_flow_from_control_time_direction() -> None:
    """σ → 1 is the (noised) control and σ → 0 the target, so FLUX's 1 → 0 sampler runs as pretrained."""
    g = torch.Generator().manual_seed(1)
    target, control, noise = (torch.randn(1, 16, 2, 2, generator=g) for _ in range(3))
    end = flow.control_endpoint(control, noise, 0.2)
    torch.testing.assert_close(end, control + 0.2 * noise)
    assert flow.control_endpoint(control, noise, 0.0) is control
    torch.testing.assert_close(flow.noisy_input(target, end, torch.ones(1)), end)
    torch.testing.assert_close(flow.noisy_input(target, end, torch.zeros(1)), target)
    v = flow.velocity_target(target, end)
    x = flow.noisy_input(target, end, torch.tensor([0.7]))
    torch.testing.assert_close(x - 0.7 * v, target)  # one Euler step to σ = 0 lands on the target
    torch.testing.assert_close(flow.x0_from_velocity(x, v, torch.tensor([0.7])), target)


def test_reference_tokens_default_per_objective() -> None:
    x = inputs()
    for flags, has_ref in [((), True), (("--flow_from_control",), False),
                           (("--flow_from_control", "--flow_reference_tokens"), True)]:
        obj = objective("--model_prediction_type", "raw", *flags)
        model = Oracle(torch.zeros(B, 16, H, W))
        flow_matching_loss(model, x, obj, 3, 5, False, False, nullcontext)
        assert (model.seen["cond"] is not None) == has_ref, flags
        if has_ref:
            torch.testing.assert_close(model.seen["cond"], pack_latents(x.cond_latents))
            assert model.seen["cond_ids"][..., 0].eq(1).all()


def test_flow_from_control_needs_a_same_size_control() -> None:
    obj = objective("--flow_from_control")
    with pytest.raises(UserError, match="needs a control image"):
        flow_matching_loss(Oracle(torch.zeros(B, 16, H, W)), inputs(cond=False), obj, 3, 5, False, False, nullcontext)
    x = inputs()
    x = StepInputs(**{**x.__dict__, "cond_latents": torch.zeros(B, 16, H, W + 2)})
    with pytest.raises(UserError, match="target's size"):
        flow_matching_loss(Oracle(torch.zeros(B, 16, H, W)), x, obj, 3, 5, False, False, nullcontext)


@pytest.mark.parametrize("argv,match", [
    (["--control_noise_std", "0.1"], "need --flow_from_control"),
    (["--flow_from_control", "--control_noise_std", "-1"], "control_noise_std"),
    (["--flow_from_control", "--control_noise_std", "nan"], "control_noise_std"),
    (["--perceptual_loss_weight", "0.1"], "--perceptual_model"),
    (["--perceptual_every_n_steps", "0"], "perceptual_every_n_steps"),
])
def test_bad_objective_flags(argv, match) -> None:
    with pytest.raises(UserError, match=match):
        build_config(parse_args(argv))


def test_metadata_round_trip(tmp_path) -> None:
    from safetensors.torch import save_file

    for o in [objective_of_training(False, 0.0, False), objective_of_training(True, 0.25, False),
              objective_of_training(True, 0.0, True)]:
        md = o.to_metadata()
        assert all(isinstance(v, str) for v in md.values())
        assert Objective.from_metadata(md) == o
        path = tmp_path / f"{o.kind}_{o.control_noise_std}_{o.reference_tokens}.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_network_dim": "4", **md})
        assert objective_of_loras([path]) == o
    assert objective_of_training(False, 0.0, True) == Objective()  # the noise objective always has references
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain), metadata={"ss_network_dim": "4"})
    assert objective_of_loras([plain]) is None
    a, b = sorted(tmp_path.glob("flow_from_control_*"))
    with pytest.raises(UserError, match="different objectives"):
        objective_of_loras([a, b])
    with pytest.raises(UserError, match="ss_flux_objective"):
        Objective.from_metadata({"ss_flux_objective": "diffusion"}, "x.safetensors")
