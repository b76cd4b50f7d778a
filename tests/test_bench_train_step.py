"""tools/bench_train_step.py: its FLOP model reproduces the peer anchors' count, and its step runs (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "tools" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_flop_model_matches_anchors_on_full_size_meta_model(bench):
    """perf-anchors.md §5: F = 21.62 TF (512²) / 74.76 TF (1024²) with kohya's 304 rank-16 LoRA modules."""
    model = bench.build_model(bench.DEV_PARAMS, torch.device("meta"), torch.bfloat16)
    params, n_modules, impl = bench.inject_lora(model, 16, 16.0, "ours")
    assert impl == "networks.lora_flux" and n_modules == 304
    assert sum(p.numel() for p in params) == 76_578_816 and params[0].dtype == torch.float32
    for res, anchor in ((512, 21.62e12), (1024, 74.76e12)):
        f = bench.forward_flops(model, (res // 16) ** 2, 512, 16)
        assert abs(f / anchor - 1) < 1e-3, (res, f)


def test_tiny_step_runs_and_trains(bench):
    results = bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--configs", "eager:ckpt:64:default",
                          "eager:nockpt:32:math"])
    assert [r.ok for r in results] == [True, True], [r.error for r in results]
    for r in results:
        assert len(r.times_ms) == 2 and all(math.isfinite(x) for x in r.losses) and r.step_tflop > 0
    assert results[0].losses[0] != results[0].losses[1]  # fresh noise each step


def test_bad_config_is_rejected(bench):
    with pytest.raises(SystemExit, match="bad config"):
        bench.Config.parse("eager:maybe:512:default")
    with pytest.raises(SystemExit, match="unknown option"):
        bench.Config.parse("eager:ckpt:512:default:x3")
    c = bench.Config.parse("compile:ck20:768:flash:r64:b2:prof")
    assert (c.mode, c.ckpt, c.blocks, c.res, c.sdpa, c.rank, c.batch, c.profile) == \
        ("compile", True, 20, 768, "flash", 64, 2, True)


def test_bench_step_is_the_trainers_step(bench, monkeypatch):
    """The bench keeps no copy of the step: it calls library.train.step.forward_backward / apply_update."""
    from library.train import step as shared

    calls = []
    real_fb, real_up = shared.forward_backward, shared.apply_update
    monkeypatch.setattr(shared, "forward_backward", lambda *a, **k: calls.append("fb") or real_fb(*a, **k))
    monkeypatch.setattr(shared, "apply_update", lambda *a, **k: calls.append("up") or real_up(*a, **k))
    results = bench.main(["--tiny", "--steps", "1", "--warmup", "1", "--configs", "eager:ck1:32:default:r8:b2"])
    assert results[0].ok and calls == ["fb", "up", "fb", "up"]
