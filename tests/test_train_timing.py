"""library/train/timing.py: the trainer's own speed lines (tools/bench_trainer.py parses them)."""

from __future__ import annotations

import math
import re

import torch

from library.train import timing


def test_median_skips_warmup_and_untimed_steps() -> None:
    assert timing.median_step_s([9.0, 8.0, 7.0, 1.0, 3.0, 2.0], skip=3) == 2.0
    assert timing.median_step_s([9.0, math.nan, 1.0, 3.0], skip=1) == 2.0
    assert math.isnan(timing.median_step_s([1.0], skip=1))


def test_summary_and_launch_lines_have_the_parsed_format() -> None:
    line = timing.summary([5.0, 4.0, 3.0, 0.5, 0.25, 0.75, 0.5], torch.device("cpu"))
    assert line == "step time: median 500.0 ms over 4 steps after the first 3"
    assert re.fullmatch(r"[\d.]+ s after launch", timing.since_launch())


def test_compile_cache_counts(monkeypatch) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters, "aot_autograd", {})
    monkeypatch.setitem(counters, "inductor", {})
    assert timing.compile_cache_counts() == ""  # nothing compiled
    counters["aot_autograd"].update(autograd_cache_hit=3, autograd_cache_miss=1)
    counters["inductor"].update(fxgraph_cache_hit=6)
    assert timing.compile_cache_counts() == \
        "compile cache: 3/4 AOT-autograd and 6/6 inductor graphs from the cache"
