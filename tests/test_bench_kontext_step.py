"""tools/bench_kontext_step.py runs the trainer's step for each objective (tiny model, CPU)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path


def test_tiny_kontext_and_flow_steps_run_and_train() -> None:
    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))
    spec = importlib.util.spec_from_file_location("bench_kontext_step", tools / "bench_kontext_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    results = bench.main(["--tiny", "--res", "32", "--steps", "2", "--warmup", "0",
                          "--configs", "eager:ckpt:kontext", "eager:nockpt:flow"])
    assert [r.ok for r in results] == [True, True], [r.error for r in results]
    assert [r.image_tokens for r in results] == [2 * 4, 4]  # 32 px = 2x2 tokens; references double them
    for r in results:
        assert len(r.times_ms) == 2 and all(math.isfinite(x) for x in r.losses)
