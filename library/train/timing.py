"""What the trainer says about its own speed and memory: time since launch, median step time, peak memory.

The loss CSV holds every optimizer step's wall time (`step_time_s`); these lines summarise it in the log,
in a fixed format that `tools/bench_trainer.py` reads back.
"""

from __future__ import annotations

import math
import statistics
import time

import psutil
import torch
from torch._dynamo.utils import counters


def since_launch() -> str:
    """'N.N s after launch' (the process's start as the OS records it), or '' where that is unknown."""
    try:
        return f"{time.time() - psutil.Process().create_time():.1f} s after launch"
    except Exception:  # noqa: BLE001 - informational only
        return "time since launch unknown"


def compile_cache_counts() -> str:
    """'compile cache: A/B AOT-autograd and C/D inductor graphs from the cache' (hits / lookups), or '' when
    nothing was compiled: a second run of the same configuration should find every graph there."""
    aot, ind = counters.get("aot_autograd", {}), counters.get("inductor", {})
    a_hit, a_miss = aot.get("autograd_cache_hit", 0), aot.get("autograd_cache_miss", 0)
    i_hit, i_miss = ind.get("fxgraph_cache_hit", 0), ind.get("fxgraph_cache_miss", 0)
    if not (a_hit + a_miss + i_hit + i_miss):
        return ""
    return (f"compile cache: {a_hit}/{a_hit + a_miss} AOT-autograd and {i_hit}/{i_hit + i_miss} inductor graphs "
            "from the cache")


def median_step_s(times: list[float], skip: int = 0) -> float:
    """Median of the timed steps after the first `skip` (warm-up, compilation); nan when none is left."""
    timed = [t for t in times[skip:] if math.isfinite(t)]
    return statistics.median(timed) if timed else math.nan


def summary(times: list[float], device: torch.device) -> str:
    """'step time: median X ms over N steps after the first 3; peak GPU memory Y GiB allocated'."""
    skip = 3 if len(times) > 5 else (1 if len(times) > 1 else 0)
    med = median_step_s(times, skip)
    text = f"step time: median {1e3 * med:.1f} ms over {len(times) - skip} steps after the first {skip}"
    if device.type == "cuda":
        text += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB allocated"
    return text
