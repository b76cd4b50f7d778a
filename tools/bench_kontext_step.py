"""Time one FLUX.1 Kontext / restoration LoRA training step beside the plain one (issue 8's GPU figures).

Full FLUX.1-dev shapes, random bf16 weights built on the GPU (tools/bench_train_step.py's build_model and its
rank-16 kohya LoRA), batch 1, 512 T5 tokens, cached latents / text outputs as random tensors. Unlike
bench_train_step.py the step is the trainer's own: `library.train.step.flow_matching_loss` (flux_shift σ, raw
prediction, bf16 autocast) → backward → clip_grad_norm_(1.0) → AdamW → zero_grad → loss.item(). Objectives:

    plain    noise → target, 4096 target tokens (1024²)
    kontext  noise → target + 4096 clean reference tokens (first id axis 1): 8192 image tokens + 512 text
    flow     --flow_from_control (control → target), no reference tokens: 4096 image tokens

A config is `mode:ckpt:objective` (mode eager|compile, ckpt ckpt|nockpt). Median of --steps after --warmup,
CUDA-synchronised; peak = torch.cuda.max_memory_allocated over the config.

    python3 tools/bench_kontext_step.py --configs eager:ckpt:plain eager:ckpt:kontext eager:ckpt:flow --out $OUT/e.json
    python3 tools/bench_kontext_step.py --configs compile:ckpt:plain compile:ckpt:flow compile:ckpt:kontext --out $OUT/c.json
    python tools/bench_kontext_step.py --tiny                                 # CPU dry run, tiny model

Run the compiled configs in a process of their own (the first two lines, ~1.5 minutes each on an H100): on
2026-12-07 (H100, torch 2.11) the first compiled step after eager ones in the same process died with "CUDA
error: an illegal memory access" (BENCHMARKS.md, issues 8 and 9); a fresh process ran them. The trainer never
switches: --torch_compile compiles before the first step.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # library.train's flag parser reads --config_file TOMLs with `toml`; the bench never does, so a bare
    import toml  # noqa: F401  device image without it still runs the trainer's step
except ImportError:
    import types

    sys.modules["toml"] = types.ModuleType("toml")

from bench_train_step import DEV_PARAMS, build_model, inject_lora  # noqa: E402
from library.flux.compile import apply_compile, remove_compile  # noqa: E402
from library.train.cli import parse_args as parse_train_args  # noqa: E402
from library.train.config import build_config  # noqa: E402
from library.train.step import StepInputs, flow_matching_loss  # noqa: E402

OBJECTIVES = {"plain": [], "kontext": [], "flow": ["--flow_from_control"]}
# compiled: kontext last, its 8192-token shape is the one recompile
DEFAULT_CONFIGS = [f"eager:ckpt:{o}" for o in ("plain", "kontext", "flow")] + \
    [f"compile:ckpt:{o}" for o in ("plain", "flow", "kontext")]


@dataclass
class Result:
    config: str
    ok: bool = False
    image_tokens: int = 0
    median_ms: float = math.nan
    min_ms: float = math.nan
    peak_gib: float = math.nan
    first_step_s: float = math.nan
    losses: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    error: str = ""


def make_inputs(objective: str, latent_hw: int, txt_len: int, device: torch.device, dtype: torch.dtype,
                context_dim: int, vec_dim: int) -> StepInputs:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 16, latent_hw, latent_hw, generator=g)
    control = torch.randn(1, 16, latent_hw, latent_hw, generator=g) if objective != "plain" else None
    return StepInputs(latents=lat.to(device), t5_out=torch.randn(1, txt_len, context_dim, generator=g).to(device, dtype),
                      clip_pooled=torch.randn(1, vec_dim, generator=g).to(device, dtype),
                      t5_attn_mask=torch.ones(1, txt_len, device=device), sample_weights=torch.ones(1, device=device),
                      loss_mask=None, keys=("bench#0",),
                      cond_latents=None if control is None else control.to(device))


def run_config(spec: str, ctx: dict, args: argparse.Namespace) -> Result:
    mode, ckpt, objective = spec.split(":")
    res = Result(spec)
    model, device, dtype = ctx["model"], ctx["device"], ctx["dtype"]
    try:
        model.enable_gradient_checkpointing() if ckpt == "ckpt" else model.disable_gradient_checkpointing()
        if mode == "compile" and not ctx["compiled"]:
            apply_compile(model, dynamic=False)
            ctx["compiled"] = True
        elif mode == "eager" and ctx["compiled"]:
            remove_compile(model)
            ctx["compiled"] = False
        obj = build_config(parse_train_args(["--timestep_sampling", "flux_shift", "--model_prediction_type", "raw",
                                             "--guidance_scale", "1.0", *OBJECTIVES[objective]])).objective
        hw = args.res // 8
        x = make_inputs(objective, hw, args.txt_len, device, dtype, ctx["params"].context_in_dim,
                        ctx["params"].vec_in_dim)
        res.image_tokens = (hw // 2) ** 2 * (2 if objective == "kontext" else 1)
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if device.type == "cuda" else nullcontext
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def step(i: int) -> float:
            loss = flow_matching_loss(model, x, obj, 0, i, True, False, autocast)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ctx["lora"], 1.0)
            ctx["opt"].step()
            ctx["opt"].zero_grad(set_to_none=True)
            return loss.item()

        for i in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            res.losses.append(step(i))
            sync(device)
            dt = time.perf_counter() - t0
            if i == 0:
                res.first_step_s = dt
            if i >= args.warmup:
                res.times_ms.append(dt * 1e3)
        res.median_ms, res.min_ms = statistics.median(res.times_ms), min(res.times_ms)
        if device.type == "cuda":
            res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        res.ok = all(math.isfinite(v) for v in res.losses)
        res.error = "" if res.ok else "non-finite loss"
    except Exception as e:  # noqa: BLE001 - record it and go on with the next config
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"[{spec}] FAILED: {res.error}", flush=True)
    return res


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (dry run of the same path)")
    ap.add_argument("--res", type=int, default=None, help="square image size (1024; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--txt-len", type=int, default=None, help="T5 tokens (512; 8 with --tiny)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=210.0, help="skip configs once this much time has passed")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after every config)")
    args = ap.parse_args(argv)
    args.res = args.res or (64 if args.tiny else 1024)
    args.txt_len = args.txt_len or (8 if args.tiny else 512)
    args.configs = args.configs or DEFAULT_CONFIGS
    for c in args.configs:
        parts = c.split(":")
        if len(parts) != 3 or parts[0] not in ("eager", "compile") or parts[1] not in ("ckpt", "nockpt") \
                or parts[2] not in OBJECTIVES:
            ap.error(f"bad config {c!r}: expected eager|compile:ckpt|nockpt:{'|'.join(OBJECTIVES)}")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.tiny:
        from library.flux.tiny import tiny_flux_params  # noqa: PLC0415

        params, device, dtype = tiny_flux_params(), torch.device("cpu"), torch.float32
    else:
        params, device, dtype = DEV_PARAMS, torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    model = build_model(params, device, dtype)
    lora, n_modules, impl = inject_lora(model, args.rank, float(args.rank), "ours")
    model.train()
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "res": args.res, "txt_len": args.txt_len, "lora_impl": impl, "lora_modules": n_modules,
            "argv": sys.argv}
    print(json.dumps(info), flush=True)
    ctx = dict(model=model, device=device, dtype=dtype, params=params, lora=lora, compiled=False,
               opt=torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-2))
    results = []
    for spec in args.configs:
        if time.perf_counter() - t_start > args.budget_s:
            results.append(Result(spec, error="skipped: time budget"))
            continue
        r = run_config(spec, ctx, args)
        results.append(r)
        print(f"[{spec}] {r.image_tokens} image tokens: median {r.median_ms:.1f} ms, peak {r.peak_gib:.2f} GiB, "
              f"first step {r.first_step_s:.1f} s, elapsed {time.perf_counter() - t_start:.0f} s", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"info": info, "results": [asdict(x) for x in results]}, indent=1))
    return results


if __name__ == "__main__":
    main()
