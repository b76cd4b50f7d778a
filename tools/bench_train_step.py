"""Time one FLUX.1-dev LoRA training step, as the peer anchors do (../shared/reference/perf-anchors.md).

The step is the trainer's own: `library.train.step.forward_backward` (noise and σ drawn per sample as in a
run, noisy input, forward under accelerate's bf16 autocast, the trainer's loss, `accelerator.backward`) and
`library.train.step.apply_update` (`accelerator.clip_grad_norm_(1.0)`, the optimizer the trainer builds for
AdamW, zero_grad). The objective is the trainer's config for `--timestep_sampling flux_shift
--model_prediction_type raw` (MSE against n - x0, as the anchors). This file keeps no copy of the step.

Full-size FLUX.1-dev transformer with random weights, built directly on the GPU in bf16 (no checkpoint is
read); rank-16 LoRA (alpha = rank, float32 weights, kohya's 304 block Linears) from `networks.lora_flux`
(or, with `--lora minimal` or when that module cannot be used, a bench-only wrapper defined below);
batch 1, 512 T5 tokens, cached latents / text-encoder outputs (random tensors).
Time = median of `--steps` steps after `--warmup` (CUDA synchronize around each step, host perf_counter),
memory = torch.cuda.max_memory_allocated over warm-up + timed steps, MFU = step FLOPs (anchors' model:
3F with checkpointing, 2F without; (2 + k/57)F with k of 57 blocks checkpointed) / (median x ceiling).

A config is `mode:ckpt:res:sdpa[:opt...]`: mode eager|compile (library.flux.compile.apply_compile, per
block), ckpt ckpt|nockpt|ckN (selective: the first N blocks), res in pixels (square), sdpa
default|flash|cudnn|efficient|math; options: prof (profile one step), ekc (compiled with checkpointing: the
older eager checkpoint around each compiled block instead of the checkpoint inside its graphs), rN (LoRA
rank), bN (batch).

    python3 tools/bench_train_step.py --configs eager:ckpt:1024:default compile:ckpt:1024:default
    python3 tools/bench_train_step.py --configs eager:ckpt:1024:default:r64 eager:ckpt:1024:default:b4
    python tools/bench_train_step.py --tiny            # CPU dry run of the same code path
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.flux.compile import apply_compile, remove_compile  # noqa: E402
from library.flux.math import make_img_ids, make_txt_ids  # noqa: E402
from library.flux.model import Flux, FluxParams  # noqa: E402

DEV_PARAMS = FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                        mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, qkv_bias=True,
                        guidance_embed=True)
ANCHOR_CEILING_TFLOPS = 688.0  # H200 bf16 matmul 8192^3, measured for the anchors
DEFAULT_CONFIGS = [f"{m}:{c}:{r}:default" for m in ("eager", "compile") for r in (512, 1024)
                   for c in ("ckpt", "nockpt")]


@dataclass
class Config:
    mode: str
    ckpt: bool
    res: int
    sdpa: str
    profile: bool = False
    blocks: int | None = None  # selective checkpointing: the first N blocks (None: all, when ckpt)
    rank: int | None = None  # None: --rank
    batch: int = 1
    in_graph: bool = True  # compiled + ckpt: checkpoint inside the block graphs (False: option ekc)

    @staticmethod
    def parse(spec: str) -> "Config":
        parts = spec.split(":")
        ck = parts[1] if len(parts) > 1 else ""
        if len(parts) < 4 or parts[0] not in ("eager", "compile") or not (
                ck in ("ckpt", "nockpt") or (ck.startswith("ck") and ck[2:].isdigit())):
            raise SystemExit(f"bad config {spec!r}: expected mode:ckpt|nockpt|ckN:res:sdpa[:prof][:ekc][:rN][:bN]")
        cfg = Config(parts[0], ck != "nockpt", int(parts[2]), parts[3],
                     blocks=int(ck[2:]) if ck not in ("ckpt", "nockpt") else None)
        for opt in parts[4:]:
            if opt == "prof":
                cfg.profile = True
            elif opt == "ekc":
                cfg.in_graph = False
            elif opt[:1] in ("r", "b") and opt[1:].isdigit():
                setattr(cfg, "rank" if opt[0] == "r" else "batch", int(opt[1:]))
            else:
                raise SystemExit(f"bad config {spec!r}: unknown option {opt!r} (prof, ekc, rN, bN)")
        return cfg

    @property
    def name(self) -> str:
        ck = "no-ckpt" if not self.ckpt else ("ckpt" if self.blocks is None else f"ckpt{self.blocks}")
        extra = (f" r{self.rank}" if self.rank else "") + (f" b{self.batch}" if self.batch != 1 else "")
        extra += " eager-checkpoint" if not self.in_graph else ""
        return f"{self.mode} {ck} {self.res} sdpa={self.sdpa}{extra}"


@dataclass
class Result:
    config: str
    ok: bool
    median_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    peak_gib: float = math.nan
    step_tflop: float = math.nan
    mfu: float = math.nan
    first_step_s: float = math.nan  # includes compilation for compiled configs
    losses: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    kernel_ms: float = math.nan
    kernels: int = 0
    error: str = ""


# -- model and LoRA -----------------------------------------------------------------------------------------
def build_model(params: FluxParams, device: torch.device, dtype: torch.dtype) -> Flux:
    """Random-initialised transformer created on `device` in `dtype` (no float32 copy ever exists)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Flux(params)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


class BenchLoRALinear(nn.Module):
    """BENCH-ONLY fallback LoRA (used with --lora minimal or when networks.lora_flux fails):
    y = base(x) + (alpha / r) · up(down(x)), down kaiming-uniform, up zero, float32 weights."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


def _minimal_lora(model: Flux, rank: int, alpha: float) -> list[nn.Parameter]:
    params = []
    for blocks in (model.double_blocks, model.single_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    wrapped = BenchLoRALinear(child, rank, alpha)
                    setattr(parent, name, wrapped)
                    params += [wrapped.down.weight, wrapped.up.weight]
    return params


def inject_lora_network(model: Flux, rank: int, alpha: float, impl: str
                        ) -> tuple[list[nn.Parameter], int, str, object | None]:
    """(trainable params, modules wrapped, implementation used, the LoRA network or None)."""
    if impl == "ours":
        try:
            from networks import lora_flux  # noqa: PLC0415

            network = lora_flux.create_network(1.0, rank, alpha, model, None, None)
            names = network.apply_to(text_encoder=False)
            network.to(dtype=torch.float32)  # as the trainer (library/train/models.inject_lora)
            network.train()
            params = [p for p in network.parameters() if p.requires_grad]
            return params, len(names), "networks.lora_flux", network
        except Exception as e:  # noqa: BLE001 - the bench must still run; say so loudly
            print(f"WARNING: networks.lora_flux unusable ({type(e).__name__}: {e}); using the bench-only LoRA",
                  flush=True)
    params = _minimal_lora(model, rank, alpha)
    return params, len(params) // 2, "bench-only minimal LoRA", None


def inject_lora(model: Flux, rank: int, alpha: float, impl: str) -> tuple[list[nn.Parameter], int, str]:
    """(trainable params, modules wrapped, implementation used)."""
    return inject_lora_network(model, rank, alpha, impl)[:3]


# -- FLOP model (perf-anchors.md §5) --------------------------------------------------------------------------
def forward_flops(model: Flux, n_img: int, n_txt: int, rank: int) -> float:
    """2·params·tokens for every Linear (its stream's tokens; modulation and embedders of `vec` act on 1),
    4·S²·hidden per block for QKᵀ and PV, and the LoRA's 2·r·(in+out)·tokens."""
    s = n_img + n_txt

    def tokens(path: str) -> int:
        if ".img_mod." in path or ".txt_mod." in path or ".modulation." in path:
            return 1
        if path.startswith("double_blocks."):
            return n_img if ".img_" in path else n_txt
        if path.startswith("single_blocks."):
            return s
        return {"img_in": n_img, "txt_in": n_txt, "final_layer.linear": n_img}.get(path, 1)

    total = 0.0
    for path, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(m).__name__ in ("Linear", "Fp8Linear") and w is not None:
            t = tokens(path.replace(".base", ""))
            if path.endswith(("lora_down", "lora_up", ".down", ".up")):
                continue
            total += 2.0 * w.shape[0] * w.shape[1] * t
            if (path.startswith(("double_blocks", "single_blocks"))) and rank:
                total += 2.0 * rank * (w.shape[0] + w.shape[1]) * t
    total += 4.0 * s * s * model.hidden_size * (len(model.double_blocks) + len(model.single_blocks))
    return total


# -- the step: the trainer's (library/train/step.py) ----------------------------------------------------------
ANCHOR_FLAGS = ["--timestep_sampling", "flux_shift", "--model_prediction_type", "raw", "--guidance_scale", "1.0",
                "--mixed_precision", "bf16", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
                "--max_grad_norm", "1.0"]


@dataclass
class StepSetup:
    """What a trainer run would hold for the step: its parsed config, accelerator and optimizer."""
    cfg: object  # library.train.config.TrainConfig
    accelerator: object
    optimizer: torch.optim.Optimizer
    params: list
    seed: int = 42
    step: int = 0


def make_setup(params: list[nn.Parameter], device: torch.device, flags: list[str] | None = None) -> StepSetup:
    """The trainer's config (from its own flag parser), accelerator and optimizer for `params`."""
    from accelerate import Accelerator  # noqa: PLC0415

    from library.train.cli import parse_args  # noqa: PLC0415
    from library.train.config import build_config  # noqa: PLC0415
    from library.train.optim import build_optimizer  # noqa: PLC0415

    from accelerate.state import AcceleratorState, PartialState  # noqa: PLC0415

    cfg = build_config(parse_args(ANCHOR_FLAGS + list(flags or [])))
    AcceleratorState._reset_state(True)  # a process may have made an accelerator of other settings before
    PartialState._reset_state()
    acc = Accelerator(mixed_precision=cfg.precision.mixed_precision, cpu=device.type == "cpu")
    opt = build_optimizer([{"params": params, "lr": cfg.optimizer.learning_rate}], cfg.optimizer)
    return StepSetup(cfg, acc, acc.prepare(opt), params)


def make_batch(res: int, txt_len: int, p: FluxParams, device: torch.device, dtype: torch.dtype,
               batch: int = 1) -> dict:
    """Cached latents / text outputs (random) as the trainer's StepInputs (key "inputs")."""
    from library.train.step import StepInputs  # noqa: PLC0415

    g = torch.Generator(device="cpu").manual_seed(0)
    h = w = res // 8
    x = StepInputs(latents=torch.randn(batch, 16, h, w, generator=g).to(device),
                   t5_out=torch.randn(batch, txt_len, p.context_in_dim, generator=g).to(device, dtype),
                   clip_pooled=torch.randn(batch, p.vec_in_dim, generator=g).to(device, dtype),
                   t5_attn_mask=torch.ones(batch, txt_len, dtype=torch.long, device=device),
                   sample_weights=torch.ones(batch, device=device), loss_mask=None,
                   keys=tuple(f"bench/{i}.png#0" for i in range(batch)))
    # The raw tensors too (importers such as tools/bench_kontext_step.py build their own model inputs).
    return {"inputs": x, "latents": x.latents, "t5": x.t5_out, "clip": x.clip_pooled,
            "img_ids": make_img_ids(batch, h // 2, w // 2).to(device),
            "txt_ids": make_txt_ids(batch, txt_len).to(device)}


def train_step(model: Flux, opt: torch.optim.Optimizer, params: list[nn.Parameter], b: dict,
               dtype: torch.dtype, setup: StepSetup | None = None) -> float:
    """One trainer step: `library.train.step.forward_backward` then `apply_update` (fresh noise per call)."""
    from library.train import step as shared  # noqa: PLC0415

    if setup is None:  # a caller with its own optimizer (kept for importers): the trainer's config around it
        setup = b.setdefault("_setup", make_setup(params, b["latents"].device))
        setup.optimizer = opt
    cfg, acc = setup.cfg, setup.accelerator
    setup.step += 1
    loss = shared.forward_backward(model, b["inputs"], cfg.objective, setup.seed, setup.step,
                                   model.params.guidance_embed, cfg.model.apply_t5_attn_mask, acc.autocast,
                                   acc.backward)
    shared.apply_update(params, setup.optimizer, cfg.optimizer.max_grad_norm, acc.clip_grad_norm_)
    return loss


def sdpa_context(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(step, device: torch.device, top: int) -> tuple[float, int]:
    """(sum of device-kernel ms, kernel count) of one step under torch.profiler; prints the `top` ops by
    host (self CPU) time, which is where a launch-bound step loses its time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60),
              flush=True)
    return sum(e.device_time for e in kernels) / 1e3, len(kernels)


def _set_rank(ctx: dict, rank: int, args: argparse.Namespace) -> None:
    """Re-inject the LoRA at `rank` (eager only: compiled graphs would retrace anyway)."""
    if ctx["rank"] == rank:
        return
    if ctx.get("network") is None:
        raise RuntimeError("changing the rank needs networks.lora_flux (not --lora minimal)")
    if ctx["compiled"]:
        remove_compile(ctx["model"])
        ctx["compiled"] = False
    ctx["network"].restore()
    ctx["setup"] = ctx["lora"] = ctx["opt"] = None
    gc.collect()
    lora, _, _, network = inject_lora_network(ctx["model"], rank, float(rank), "ours")
    ctx.update(lora=lora, network=network, rank=rank, setup=make_setup(lora, ctx["device"]))
    ctx["opt"] = ctx["setup"].optimizer


def prepare(cfg: Config, ctx: dict, args: argparse.Namespace):
    """Put the model in the config's state; returns (the step function, step FLOPs)."""
    model, device, dtype = ctx["model"], ctx["device"], ctx["dtype"]
    _set_rank(ctx, cfg.rank or args.rank, args)
    if cfg.ckpt:
        model.enable_gradient_checkpointing(blocks=cfg.blocks)
    else:
        model.disable_gradient_checkpointing()
    if cfg.mode == "compile" and ctx["compiled"] and ctx.get("in_graph") != cfg.in_graph:
        remove_compile(model)  # re-applied below; dynamo's cache keeps the graphs already compiled
        ctx["compiled"] = False
    if cfg.mode == "compile" and not ctx["compiled"]:
        apply_compile(model, backend=args.compile_backend, dynamic=args.dynamic, mode=args.compile_mode,
                      checkpoint_in_graph=cfg.in_graph)
        ctx.update(compiled=True, in_graph=cfg.in_graph)
    elif cfg.mode == "eager" and ctx["compiled"]:
        remove_compile(model)
        ctx["compiled"] = False
    batch = make_batch(cfg.res, args.txt_len, ctx["params"], device, dtype, cfg.batch)
    f = cfg.batch * forward_flops(model, (cfg.res // 16) ** 2, args.txt_len, ctx["rank"])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        with sdpa_context(cfg.sdpa):
            return train_step(model, ctx["opt"], ctx["lora"], batch, dtype, ctx["setup"])

    n = len(model.double_blocks) + len(model.single_blocks)
    k = 0 if not cfg.ckpt else (n if cfg.blocks is None else cfg.blocks)
    return step, (2 + k / n) * f


def profile_config(cfg: Config, ctx: dict, args: argparse.Namespace, res: Result) -> None:
    """Profile one step of `cfg` after every config was timed: a profiler session leaves the process
    slower to launch kernels afterwards (seen on the H200: a host-bound 512² step +50% after it)."""
    try:
        step, _ = prepare(cfg, ctx, args)
        step()
        res.kernel_ms, res.kernels = profile_step(step, ctx["device"], args.top_ops)
    except Exception as e:  # noqa: BLE001
        print(f"[{cfg.name}] profiling failed: {type(e).__name__}: {e}", flush=True)


def run_config(cfg: Config, ctx: dict, args: argparse.Namespace) -> Result:
    device = ctx["device"]
    res = Result(cfg.name, ok=False)
    try:
        step, flops = prepare(cfg, ctx, args)
        res.step_tflop = flops / 1e12

        for i in range(args.warmup):
            t0 = time.perf_counter()
            res.losses.append(step())
            _sync(device)
            if i == 0:
                res.first_step_s = time.perf_counter() - t0
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            res.losses.append(step())
            _sync(device)
            res.times_ms.append((time.perf_counter() - t0) * 1e3)
        res.median_ms = statistics.median(res.times_ms)
        res.min_ms, res.max_ms = min(res.times_ms), max(res.times_ms)
        if device.type == "cuda":
            res.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
        res.mfu = res.step_tflop / (res.median_ms / 1e3) / ctx["ceiling"]
        res.ok = all(math.isfinite(x) for x in res.losses)
        if not res.ok:
            res.error = "non-finite loss"
    except Exception as e:  # noqa: BLE001 - record and go on with the next config
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"[{cfg.name}] FAILED: {res.error}", flush=True)
    return res


def matmul_ceiling(device: torch.device) -> float:
    """bf16 8192^3 matmul TFLOP/s, median of 5 timings of 20 products (CUDA events)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    rates = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        rates.append(20 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12)
    return statistics.median(rates)


def sdpa_choice(device: torch.device, dtype: torch.dtype, s: int, heads: int) -> str:
    """Which backend torch's default SDPA dispatch picks for our q/k/v layout (B, H, L, D contiguous)."""
    try:
        q = torch.randn(1, heads, s, 128, device=device, dtype=dtype, requires_grad=True)
        from torch.nn.attention import SDPBackend  # noqa: PLC0415

        return SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({type(e).__name__})"


def print_table(results: list[Result], ceiling: float) -> None:
    print(f"\nstep table (median of timed steps; MFU vs {ceiling:.0f} TFLOP/s)")
    print(f"| config | median ms | min | max | peak GiB | step TFLOP | MFU | first step s | kernels (ms / n) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if not r.ok and math.isnan(r.median_ms):
            print(f"| {r.config} | FAILED: {r.error} |||||||")
            continue
        kern = f"{r.kernel_ms:.0f} / {r.kernels}" if r.kernels else ""
        print(f"| {r.config} | {r.median_ms:.1f} | {r.min_ms:.1f} | {r.max_ms:.1f} | {r.peak_gib:.2f} | "
              f"{r.step_tflop:.1f} | {100 * r.mfu:.1f}% | {r.first_step_s:.1f} | {kern} |"
              + ("" if r.ok else f" {r.error}"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (dry run of the same path)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--txt-len", type=int, default=None, help="T5 tokens (512; 8 with --tiny)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora", choices=("ours", "minimal"), default="ours")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--dynamic", choices=("false", "true", "auto"), default="false",
                    help="apply_compile(dynamic=False | True | None)")
    ap.add_argument("--top-ops", type=int, default=0, help="with :prof, print this many ops by host time")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip configs once this much time has passed")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after every config)")
    args = ap.parse_args(argv)
    args.dynamic = {"false": False, "true": True, "auto": None}[args.dynamic]
    if args.txt_len is None:
        args.txt_len = 8 if args.tiny else 512
    if args.configs is None:
        args.configs = ["eager:ckpt:64:default", "eager:nockpt:64:flash", "compile:ckpt:64:default:prof"] \
            if args.tiny else DEFAULT_CONFIGS
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    configs = [Config.parse(c) for c in args.configs]
    if args.tiny:
        from library.flux.tiny import tiny_flux_params  # noqa: PLC0415

        params, device, dtype = tiny_flux_params(), torch.device("cpu"), torch.bfloat16
    else:
        params, device, dtype = DEV_PARAMS, torch.device("cuda"), torch.bfloat16
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "argv": sys.argv}
    ceiling = matmul_ceiling(device) if device.type == "cuda" else ANCHOR_CEILING_TFLOPS
    info["matmul_tflops_measured"] = ceiling
    ceiling = ANCHOR_CEILING_TFLOPS if args.tiny else ceiling
    t0 = time.perf_counter()
    model = build_model(params, device, dtype)
    _sync(device)
    info["build_s"] = time.perf_counter() - t0
    lora, n_modules, impl, network = inject_lora_network(model, args.rank, float(args.rank), args.lora)
    info.update(lora_impl=impl, lora_modules=n_modules, lora_params=sum(p.numel() for p in lora),
                lora_dtype=str(lora[0].dtype), base_params=sum(p.numel() for p in model.parameters()) - sum(
                    p.numel() for p in lora))
    info["sdpa_default_1024"] = sdpa_choice(device, dtype, (1024 // 16) ** 2 + args.txt_len, params.num_heads)
    print(json.dumps(info), flush=True)
    model.train()
    setup = make_setup(lora, device)
    ctx = dict(model=model, device=device, dtype=dtype, params=params, lora=lora, opt=setup.optimizer,
               setup=setup, network=network, rank=args.rank, compiled=False, ceiling=ceiling)
    results = []
    for cfg in configs:
        if time.perf_counter() - t_start > args.budget_s:
            results.append(Result(cfg.name, ok=False, error="skipped: time budget"))
            continue
        r = run_config(cfg, ctx, args)
        results.append(r)
        print(f"[{cfg.name}] median {r.median_ms:.1f} ms, peak {r.peak_gib:.2f} GiB, MFU {100 * r.mfu:.1f}%, "
              f"first step {r.first_step_s:.1f} s, elapsed {time.perf_counter() - t_start:.0f} s", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"info": info, "results": [asdict(x) for x in results]}, indent=1))
    for cfg, r in zip(configs, results):
        if cfg.profile and r.ok:
            profile_config(cfg, ctx, args, r)
    if args.out:
        args.out.write_text(json.dumps({"info": info, "results": [asdict(x) for x in results]}, indent=1))
    print_table(results, ceiling)
    return results


if __name__ == "__main__":
    main()
