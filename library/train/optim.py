"""Optimizers and LR schedulers by kohya's names.

`--optimizer_type` accepts kohya's names (case-insensitive) or any `module.Class`; `--optimizer_args
key=value ...` values are Python literals, and `a,b` becomes a tuple (kohya's rule). Schedulers are
LambdaLR multipliers written out here (their formulas match transformers' `get_scheduler`, which the tests
check); other transformers scheduler names and `--lr_scheduler_type module.Class` are passed through.
The scheduler is stepped once per optimizer step by the trainer (not by accelerate), so its step count
never depends on the number of processes.
"""

from __future__ import annotations

import ast
import importlib
import math
from typing import Any, Callable, Iterable

import torch

from library.errors import UserError
from library.train.config import OptimizerConfig, SchedulerConfig

ParamGroups = list[dict[str, Any]]


def parse_kv_args(items: Iterable[str], flag: str) -> dict[str, Any]:
    """['weight_decay=0.01', 'betas=0.9,0.999'] -> {'weight_decay': 0.01, 'betas': (0.9, 0.999)}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"command line: --{flag}: expected key=value, got {item!r}")
        parts = [p for p in text.split(",")] if "," in text else [text]
        values = [_literal(p.strip()) for p in parts if p.strip() != "" or len(parts) == 1]
        out[key.strip()] = tuple(values) if "," in text else values[0]
    return out


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as a name: keep it as a string (kohya does the same)


def _bnb(name: str) -> type:
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 (optional dependency, imported on use)
    except Exception as err:  # bitsandbytes fails in many ways without a GPU build
        raise UserError(
            f"command line: --optimizer_type {name} needs bitsandbytes, which cannot be loaded here ({err}); "
            "install bitsandbytes or use --optimizer_type AdamW"
        ) from None
    return getattr(bnb.optim, name)


def _import_class(path: str, flag: str) -> type:
    module_name, _, cls_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"command line: --{flag} {path}: cannot import it ({err})") from None


def _optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    """kohya name -> (class, default kwargs)."""
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW, {}
    if key in ("adamw8bit", "pagedadamw8bit", "pagedadamw", "pagedadamw32bit", "lion8bit", "pagedlion8bit"):
        cls_name = {"adamw8bit": "AdamW8bit", "pagedadamw8bit": "PagedAdamW8bit", "pagedadamw": "PagedAdamW",
                    "pagedadamw32bit": "PagedAdamW32bit", "lion8bit": "Lion8bit", "pagedlion8bit": "PagedLion8bit"}[key]
        return _bnb(cls_name), {}
    if key == "lion":
        return _bnb("Lion"), {}  # 32-bit Lion (Chen et al. 2023); kohya uses lion-pytorch, same update rule
    if key == "sgdnesterov":
        return torch.optim.SGD, {"nesterov": True, "momentum": 0.9}
    if key == "sgdnesterov8bit":
        return _bnb("SGD8bit"), {"nesterov": True, "momentum": 0.9}
    if key == "prodigy":
        from prodigyopt import Prodigy  # noqa: PLC0415

        return Prodigy, {}
    if key == "adafactor":
        from transformers.optimization import Adafactor  # noqa: PLC0415

        return Adafactor, {"scale_parameter": True, "relative_step": True, "warmup_init": False}
    if key.startswith("dadapt") or key.endswith("schedulefree"):
        raise UserError(f"command line: --optimizer_type {name} is not installed here; use Prodigy (a D-Adaptation "
                        "successor), AdamW or a full module.Class path")
    if "." in name:
        return _import_class(name, "optimizer_type"), {}
    known = "AdamW, AdamW8bit, PagedAdamW8bit, PagedAdamW, Lion, Lion8bit, SGDNesterov, Prodigy, Adafactor"
    raise UserError(f"command line: --optimizer_type {name}: unknown; use one of {known} or module.Class")


def is_relative_step_adafactor(cfg: OptimizerConfig) -> bool:
    kwargs = parse_kv_args(cfg.optimizer_args, "optimizer_args")
    return cfg.optimizer_type.lower() == "adafactor" and bool(kwargs.get("relative_step", True))


def _construct(groups: ParamGroups, cfg: OptimizerConfig) -> tuple[torch.optim.Optimizer, type, dict[str, Any]]:
    cls, kwargs = _optimizer_class(cfg.optimizer_type)
    kwargs.update(parse_kv_args(cfg.optimizer_args, "optimizer_args"))
    lr: float | None = cfg.learning_rate
    if is_relative_step_adafactor(cfg):
        # Adafactor's relative step computes its own step size; a manual lr is an error in transformers.
        lr = None
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
    try:
        return cls(groups, lr=lr, **kwargs), cls, kwargs
    except (TypeError, ValueError) as err:  # unknown keyword / out-of-range value (e.g. betas)
        raise UserError(f"command line: --optimizer_args for {cfg.optimizer_type}: {err}") from None


def build_optimizer(groups: ParamGroups, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Groups carry their own 'lr' (LoRA sets unet/text-encoder LRs); the default LR is --learning_rate."""
    optimizer, cls, kwargs = _construct(groups, cfg)
    if cls.__module__.startswith("bitsandbytes"):
        _probe_bitsandbytes(cls, kwargs, cfg.optimizer_type, groups)
    return optimizer


def check_optimizer(cfg: OptimizerConfig) -> None:
    """Before any heavy work: --optimizer_type resolves and accepts --optimizer_args (built once over a
    throw-away parameter; the bitsandbytes device probe waits for the real device in `build_optimizer`)."""
    _construct([{"params": [torch.nn.Parameter(torch.zeros(1))]}], cfg)


def _probe_bitsandbytes(cls: type, kwargs: dict[str, Any], name: str, groups: ParamGroups) -> None:
    """One step on a throw-away tensor on the training device: some bitsandbytes builds have no kernels for
    the CPU (or this GPU) and would otherwise fail deep inside the first training step."""
    device = next(p for g in groups for p in g["params"]).device
    probe = torch.nn.Parameter(torch.zeros(64, 64, device=device))  # 4096 elements: the 8-bit path is used
    probe.grad = torch.ones_like(probe)
    try:
        cls([probe], lr=1e-3, **kwargs).step()
    except (RuntimeError, NotImplementedError, AttributeError, OSError) as err:
        raise UserError(f"command line: --optimizer_type {name}: bitsandbytes cannot run it on {device.type} here "
                        f"({str(err).splitlines()[0][:160]}); use --optimizer_type AdamW (or Lion / Prodigy)") from None


# --- schedulers: multiplier of the base LR at step s (0-based count of optimizer steps taken) ---

def _warm(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              lr_init: float = 1.0, lr_end: float = 1e-7) -> Callable[[int], float]:
    """Multiplier functions with transformers' formulas (get_*_schedule_with_warmup)."""
    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        return _warm(step, warmup) if step < warmup else 1.0

    def linear(step: int) -> float:
        w = _warm(step, warmup)
        return w if w is not None else max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    def cosine_with_restarts(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))

    def polynomial(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        if step > total:
            return lr_end / lr_init
        remaining = 1 - (step - warmup) / max(1, total - warmup)
        return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init

    table = {"constant": constant, "constant_with_warmup": constant_with_warmup, "linear": linear,
             "cosine": cosine, "cosine_with_restarts": cosine_with_restarts, "polynomial": polynomial}
    return table[name]


LAMBDA_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def resolve_steps(value: int | float, total: int) -> int:
    """kohya's int_or_float: an int is a step count, a float < 1 a ratio of the training steps."""
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int,
                    base_lr: float, adafactor_relative: bool = False) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = resolve_steps(cfg.lr_warmup_steps, total_steps)
    if cfg.lr_scheduler_type:
        cls = _import_class(cfg.lr_scheduler_type, "lr_scheduler_type")
        return cls(optimizer, **parse_kv_args(cfg.lr_scheduler_args, "lr_scheduler_args"))
    if adafactor_relative or cfg.lr_scheduler == "adafactor":
        from transformers.optimization import AdafactorSchedule  # noqa: PLC0415

        return AdafactorSchedule(optimizer, initial_lr=base_lr)
    if cfg.lr_scheduler in LAMBDA_SCHEDULERS:
        fn = lr_lambda(cfg.lr_scheduler, warmup, total_steps, cfg.lr_scheduler_num_cycles,
                       cfg.lr_scheduler_power, lr_init=base_lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    return _transformers_scheduler(optimizer, cfg, warmup, total_steps)


def _transformers_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, warmup: int,
                            total: int) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers.optimization import get_scheduler  # noqa: PLC0415

    kwargs = parse_kv_args(cfg.lr_scheduler_args, "lr_scheduler_args")
    if cfg.lr_scheduler_min_lr_ratio is not None:
        kwargs.setdefault("min_lr_rate", cfg.lr_scheduler_min_lr_ratio)
    if cfg.lr_scheduler == "inverse_sqrt" and cfg.lr_scheduler_timescale is not None:
        kwargs.setdefault("timescale", cfg.lr_scheduler_timescale)
    if cfg.lr_scheduler == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", resolve_steps(cfg.lr_decay_steps, total))
    try:
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                             scheduler_specific_kwargs=kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"command line: --lr_scheduler {cfg.lr_scheduler}: {err}") from None


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The current LR of every parameter group (Prodigy/D-Adaptation report lr·d, the effective step)."""
    out = []
    for g in optimizer.param_groups:
        lr = g.get("lr") or 0.0
        out.append(float(lr * g["d"]) if "d" in g else float(lr))
    return out
