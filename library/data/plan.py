"""The training plan printed before training and by --dry_run: images, repeats, buckets, steps.

Steps and epochs come from library.schedule (the formula the trainer uses).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from library.data.config import ResolvedDatasetConfig
from library.data.dataset import FluxDataset, build_datasets
from library.data.degrade import DegradationConfig
from library.schedule import DEFAULT_MAX_TRAIN_STEPS, batches_per_rank, make_schedule


@dataclass(frozen=True)
class SubsetPlan:
    source: str
    style: str
    images: int
    repeats: str  # "10" or "3..4" for balanced reg images
    is_reg: bool
    samples: int  # images x repeats per epoch
    buckets: tuple[tuple[tuple[int, int], int], ...] = ()  # ((W, H), samples per epoch) of this subset
    variants: int = 1  # degraded versions per image (restoration pairs), else 1
    degradation: str = ""  # the degradation ops and ranges, as printed


@dataclass(frozen=True)
class DatasetPlan:
    index: int
    resolution: tuple[int, int]
    batch_size: int
    subsets: tuple[SubsetPlan, ...]
    buckets: tuple[tuple[tuple[int, int], int], ...]  # ((W, H), samples per epoch)
    batches: int


@dataclass(frozen=True)
class Plan:
    datasets: tuple[DatasetPlan, ...]
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    validation_images: int = 0


def build_plan(dataset: FluxDataset, max_train_steps: int = DEFAULT_MAX_TRAIN_STEPS,
               max_train_epochs: int | None = None, gradient_accumulation_steps: int = 1, num_processes: int = 1,
               validation: FluxDataset | None = None) -> Plan:
    refs = dataset.batches(0)
    plans = []
    for i, ds in enumerate(dataset.cfg.datasets):
        items = [it for it in dataset.items[i] if it.uid not in dataset.bad]
        subs = []
        for j, sub in enumerate(ds.subsets):
            mine = [it for it in items if it.subset == j]
            reps = sorted({it.repeats for it in mine}) or [sub.num_repeats]
            sub_buckets = Counter()
            for it in mine:
                sub_buckets[it.assignment.bucket] += it.repeats
            deg = sub.degradation
            subs.append(SubsetPlan(str(sub.image_dir or sub.metadata_file), ds.style, len({it.path for it in mine}),
                                   str(reps[0]) if len(reps) == 1 else f"{reps[0]}..{reps[-1]}", sub.is_reg,
                                   sum(it.repeats for it in mine), tuple(sorted(sub_buckets.items())),
                                   deg.variants if deg else 1, describe_degradation(deg) if deg else ""))
        counts = Counter()
        for it in items:
            counts[it.assignment.bucket] += it.repeats
        plans.append(DatasetPlan(i, ds.resolution, ds.batch_size, tuple(subs), tuple(sorted(counts.items())),
                                 sum(1 for r in refs if r.dataset == i)))
    sched = make_schedule(batches_per_rank(len(refs), num_processes), gradient_accumulation_steps,
                          max_train_steps, max_train_epochs)
    n_val = sum(len(its) for its in validation.items) if validation else 0
    return Plan(tuple(plans), len(refs), sched.steps_per_epoch, sched.epochs, sched.total_steps, n_val)


def describe_degradation(cfg: DegradationConfig) -> str:
    """"downsample -> noise; downsample [2, 8] (bicubic), noise_sigma [0, 0.06]": the ops and their ranges."""
    def show(v: object) -> str:
        return f"[{v[0]:g}, {v[1]:g}]" if isinstance(v, tuple) else str(v)

    ranges = ", ".join(f"{k} {show(v)}" for k, v in cfg.ranges().items())
    seed = f"; seed {cfg.seed}" if cfg.seed is not None else ""
    return f"{' -> '.join(cfg.ops)}; {ranges}{seed}"


def format_plan(plan: Plan) -> str:
    lines = ["training plan"]
    for d in plan.datasets:
        lines.append(f"  dataset {d.index}: resolution {d.resolution[0]}x{d.resolution[1]}, "
                     f"batch_size {d.batch_size}, {d.batches} batches per epoch")
        for s in d.subsets:
            reg = " (reg)" if s.is_reg else ""
            var = f" x {s.variants} variants" if s.degradation else ""
            lines.append(f"    subset {s.source}{reg}: {s.images} images{var} x {s.repeats} repeats = {s.samples} samples")
            if s.degradation:
                lines.append(f"      degradation (control image made from the image): {s.degradation}")
            lines.append("      buckets " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in s.buckets))
        for (w, h), n in d.buckets:
            lines.append(f"    bucket {w}x{h}: {n} samples ({-(-n // d.batch_size)} batches)")
    lines.append(f"  batches per epoch: {plan.batches_per_epoch}; steps per epoch: {plan.steps_per_epoch}")
    lines.append(f"  epochs: {plan.epochs}; total optimizer steps: {plan.total_steps}")
    if plan.validation_images:
        lines.append(f"  validation images: {plan.validation_images}")
    return "\n".join(lines)


def make_plan(resolved: ResolvedDatasetConfig, seed: int = 0, max_train_steps: int = DEFAULT_MAX_TRAIN_STEPS,
              max_train_epochs: int | None = None, gradient_accumulation_steps: int = 1, num_processes: int = 1,
              skip_bad_images: bool = False, progress: bool = True) -> Plan:
    """--dry_run: scan the images of a resolved config (headers only, no model) and plan the run."""
    train, val = build_datasets(resolved, seed, skip_bad_images, progress)
    return build_plan(train, max_train_steps, max_train_epochs, gradient_accumulation_steps, num_processes, val)
