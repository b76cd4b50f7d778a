"""Optimizers by kohya name and LR schedulers (parity with transformers.get_scheduler)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from library.errors import UserError
from library.train.cli import parse_args
from library.train.config import build_config
from library.train.optim import (
    LAMBDA_SCHEDULERS, build_optimizer, build_scheduler, group_lrs, parse_kv_args, resolve_steps,
)


def _opt_cfg(*argv: str):
    return build_config(parse_args(list(argv))).optimizer


def _sched_cfg(*argv: str):
    return build_config(parse_args(list(argv))).scheduler


def test_parse_kv_args_follows_kohya() -> None:
    got = parse_kv_args(["weight_decay=0.01", "betas=0.9,0.999", "decouple=True", "d_coef=2", "name=foo"], "x")
    assert got == {"weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True, "d_coef": 2, "name": "foo"}
    with pytest.raises(UserError, match="key=value"):
        parse_kv_args(["oops"], "optimizer_args")


OPTIMIZERS = ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor",
              "SGDNesterov", "torch.optim.RMSprop"]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_a_quadratic(name: str) -> None:
    torch.manual_seed(0)
    # 8-bit bitsandbytes states need >= 4096 elements to quantise blockwise; use a realistic LoRA-sized matrix
    target = torch.randn(16, 512)
    w = torch.nn.Parameter(torch.zeros(16, 512))
    lr = {"Prodigy": 1.0, "Lion": 1e-2, "Lion8bit": 1e-2, "SGDNesterov": 100.0}.get(name, 5e-2)
    args = ["--optimizer_type", name, "--learning_rate", str(lr)]
    if name == "Adafactor":
        args += ["--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False"]
    opt = build_optimizer([{"params": [w], "lr": lr}], _opt_cfg(*args))
    start = ((w - target) ** 2).mean().item()
    for _ in range(20):
        opt.zero_grad()
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert ((w - target) ** 2).mean().item() < 0.9 * start, name
    assert all(lr_ > 0 for lr_ in group_lrs(opt))


def test_adafactor_relative_step_drops_the_manual_lr() -> None:
    w = torch.nn.Parameter(torch.zeros(8, 8))
    cfg = _opt_cfg("--optimizer_type", "AdaFactor", "--learning_rate", "1e-4")
    opt = build_optimizer([{"params": [w], "lr": 1e-4}], cfg)
    assert opt.param_groups[0]["lr"] is None
    sched = build_scheduler(opt, _sched_cfg(), 10, 1e-4, adafactor_relative=True)
    w.grad = torch.ones_like(w)
    opt.step()
    sched.step()
    assert sched.get_lr()[0] > 0


def test_optimizer_errors() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match="unknown"):
        build_optimizer([{"params": [w]}], _opt_cfg("--optimizer_type", "AdamQ"))
    with pytest.raises(UserError, match="cannot import"):
        build_optimizer([{"params": [w]}], _opt_cfg("--optimizer_type", "nowhere.Optim"))
    with pytest.raises(UserError, match="optimizer_args"):
        build_optimizer([{"params": [w]}], _opt_cfg("--optimizer_args", "bogus_arg=1"))
    assert _opt_cfg("--use_8bit_adam").optimizer_type == "AdamW8bit"
    assert _opt_cfg().optimizer_type == "AdamW"


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", LAMBDA_SCHEDULERS)
def test_schedulers_match_transformers(name: str) -> None:
    from transformers.optimization import get_scheduler

    total, warmup, base = 40, 6, 1e-3
    kwargs = {"cosine_with_restarts": {"num_cycles": 3}, "polynomial": {"power": 2.0}}.get(name, {})
    argv = ["--lr_scheduler", name, "--lr_warmup_steps", str(warmup), "--lr_scheduler_num_cycles", "3",
            "--lr_scheduler_power", "2.0"]
    mine_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    mine = build_scheduler(mine_opt, _sched_cfg(*argv), total, base)
    ref = get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total,
                        scheduler_specific_kwargs=kwargs)
    got, expected = _lrs(mine, mine_opt, total + 2), _lrs(ref, ref_opt, total + 2)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if name != "constant":
        assert got[0] == 0.0 and got[warmup] == pytest.approx(base)  # warmup from zero


def test_warmup_ratio_and_passthrough_scheduler() -> None:
    assert resolve_steps(0.1, 200) == 20 and resolve_steps(7, 200) == 7
    cfg = _sched_cfg("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1",
                     "--lr_warmup_steps", "0.25")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(build_scheduler(opt, cfg, 20, 1.0), opt, 20)
    assert lrs[5] == pytest.approx(1.0) and min(lrs[5:]) >= 0.1 - 1e-9
    bad = dataclasses.replace(cfg, lr_scheduler="nope")
    with pytest.raises(UserError, match="nope"):
        build_scheduler(opt, bad, 20, 1.0)


def test_a_bitsandbytes_optimizer_that_cannot_run_gives_a_clear_message(monkeypatch) -> None:
    import bitsandbytes as bnb

    class Broken(torch.optim.SGD):
        __module__ = "bitsandbytes.optim.fake"

        def step(self, closure=None):  # what a build without CPU kernels does
            raise NotImplementedError("no CPU kernel for optimizer_update_8bit_blockwise")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Broken)
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match="AdamW8bit: bitsandbytes cannot run it on cpu here .*--optimizer_type AdamW"):
        build_optimizer([{"params": [w], "lr": 1.0}], _opt_cfg("--optimizer_type", "AdamW8bit"))


def test_inverse_sqrt_takes_the_timescale_flag() -> None:
    from transformers.optimization import get_scheduler

    cfg = _sched_cfg("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "2", "--lr_scheduler_timescale", "4")
    mine_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler("inverse_sqrt", ref_opt, num_warmup_steps=2, scheduler_specific_kwargs={"timescale": 4})
    assert _lrs(build_scheduler(mine_opt, cfg, 20, 1.0), mine_opt, 20) == pytest.approx(_lrs(ref, ref_opt, 20))
