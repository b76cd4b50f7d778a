"""Running a differential LoRA: stage 1 (before images), then stage 2 (after images on base + stage 1).

Progress is recorded in `<output_dir>/<X>_differential.json` (written atomically): the settings'
fingerprint and, per finished stage, its file and sha256. Running the same command again continues where
it stopped: a finished stage is skipped (its file's hash is checked), an interrupted one resumes from its
newest saved state (`--save_state` / `--save_every_n_steps`, or the state SIGINT/SIGTERM leaves), and a
finished run does nothing. Files that exist without such a record are the user's: never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from library.atomic import write_text_atomic
from library.data.config import load_dataset_config
from library.data.plan import format_plan, make_plan
from library.differential.stages import (DifferentialOptions, Stage, check_command, plan_stage1, plan_stage2,
                                         result_name)
from library.errors import UserError
from library.train.checkpoint import file_sha256
from library.train.cli import ParsedArgs, non_default_values
from library.train.config import TrainConfig
from networks import lora_keys as K
from networks.lora_formats import read_lora

log = logging.getLogger(__name__)

PROGRESS_VERSION = 1
Trainer = Callable[[TrainConfig], None]


def check_stage1_file(path: Path) -> None:
    """A given or resumed stage-1 file must be a FLUX LoRA with transformer modules (one line otherwise)."""
    if not path.is_file():
        raise UserError(f"{path}: --stage1_weights: no such file")
    weights = read_lora(path).weights  # UserError naming the file for anything that is not a LoRA
    if not any(K.split_kohya_name(n)[0] == "transformer" for n in weights):
        raise UserError(f"{path}: --stage1_weights: not a FLUX LoRA (no transformer module among {len(weights)})")


@dataclass
class Progress:
    path: Path
    fingerprint: str
    stages: dict[str, dict[str, str]]  # "1" / "2" -> {"file", "sha256"}

    def save(self) -> None:
        text = json.dumps({"version": PROGRESS_VERSION, "fingerprint": self.fingerprint, "stages": self.stages},
                          indent=1)
        if not self.path.is_file() or self.path.read_text(encoding="utf-8") != text:
            write_text_atomic(self.path, text)

    def done(self, stage: Stage) -> bool:
        """Whether the stage finished earlier (and its file is unchanged since)."""
        rec = self.stages.get(str(stage.index))
        if rec is None:
            return False
        if not stage.path.is_file() or file_sha256(stage.path) != rec["sha256"]:
            raise UserError(f"{stage.path}: changed or removed since stage {stage.index} finished (recorded in "
                            f"{self.path}); restore it, or delete {self.path} and the run's files to start over")
        return True

    def finish(self, stage: Stage) -> str:
        digest = file_sha256(stage.path)
        self.stages[str(stage.index)] = {"file": stage.path.name, "sha256": digest}
        self.save()
        return digest


def fingerprint(parsed: ParsedArgs, opts: DifferentialOptions, extra: dict[str, Any] | None = None) -> str:
    # where the run writes and how it logs are not settings of the LoRA: a moved output folder still resumes
    skip = ("output_dir", "logging_dir", "console_log_level", "console_log_file", "console_log_simple")
    values = {k: v for k, v in non_default_values(parsed).items() if k not in skip}
    blob = json.dumps([values, opts.__dict__, extra or {}], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_progress_record(path: Path, out_dir: Path, print_: str, field: str, what: str,
                         value: Callable[[Any], Any] = lambda v: v) -> dict[str, Any]:
    """`{"fingerprint": ..., field: {key: record}}` at `path` -> its records (keys as str, each through `value`);
    refuses a damaged file and a record of other settings (`print_` is this run's fingerprint)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = {str(k): value(v) for k, v in data[field].items()}
        old = str(data["fingerprint"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not {what} progress record; remove it or choose another --output_name") from None
    if old != print_:
        raise UserError(f"{path}: an earlier run with other settings wrote into {out_dir}; choose another "
                        "--output_name or --output_dir (or delete its files to start over)")
    return records


def open_progress(out_dir: Path, name: str, print_: str, owned: list[Path]) -> Progress:
    """The run's progress record; refuses a record of other settings and files the run does not own."""
    path = out_dir / f"{name}_differential.json"
    if path.is_file():
        return Progress(path, print_, read_progress_record(path, out_dir, print_, "stages", "a differential", dict))
    taken = [p for p in owned if p.exists()]
    if taken:
        raise UserError(f"{taken[0]}: already exists and is not from this run (no {path.name}); choose another "
                        "--output_name or --output_dir")
    return Progress(path, print_, {})


def latest_state(out_dir: Path, name: str) -> Path | None:
    """The newest training state `<name>-…-state` (by its global step), or None."""
    best, best_step = None, -1
    for d in out_dir.glob(f"{name}-*state") if out_dir.is_dir() else []:
        if d.name != f"{name}-state" and not d.name[len(name) + 1:-len("-state")].replace("step", "").isdigit():
            continue  # another name's state (e.g. X_stage1-... for X)
        try:
            step = int(json.loads((d / "train_state.json").read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            continue
        if step > best_step:
            best, best_step = d, step
    return best


def _with_resume(cfg: TrainConfig, state: Path | None) -> TrainConfig:
    if state is None:
        return cfg
    log.info("resuming %s from %s", cfg.save.output_name, state)
    return dataclasses.replace(cfg, save=dataclasses.replace(cfg.save, resume=str(state)))


def run_stage(stage: Stage, progress: Progress, train: Trainer) -> str:
    """Train the stage unless it finished earlier; returns its file's sha256."""
    if progress.done(stage):
        log.info("stage %d: %s finished earlier, kept", stage.index, stage.path)
        return progress.stages[str(stage.index)]["sha256"]
    assert stage.train is not None
    out = Path(stage.train.save.output_dir)
    train(_with_resume(stage.train, latest_state(out, stage.output_name)))
    if not stage.path.is_file():
        raise UserError(f"{stage.path}: stage {stage.index} ended without writing its LoRA")
    return progress.finish(stage)


def run_differential(parsed: ParsedArgs, opts: DifferentialOptions, train: Trainer) -> Path:
    """Both stages; returns the result (stage 2's file)."""
    check_command(parsed)
    out_dir, name = Path(parsed.values["output_dir"] or "output"), result_name(parsed)
    stage1 = plan_stage1(parsed, opts)
    check_pairs(stage1.train or plan_stage2(parsed, stage1.path, None).train)
    owned = [out_dir / f"{name}.safetensors"] + ([] if opts.stage1_weights else [stage1.path])
    extra = {"stage1_weights_sha256": file_sha256(Path(opts.stage1_weights))} if opts.stage1_weights and \
        Path(opts.stage1_weights).is_file() else None
    progress = open_progress(out_dir, name, fingerprint(parsed, opts, extra), owned)
    if stage1.train is None:
        check_stage1_file(stage1.path)
        digest = file_sha256(stage1.path)
    else:
        progress.save()  # claims the output names before the first file is written
        digest = run_stage(stage1, progress, train)
        check_stage1_file(stage1.path)
    stage2 = plan_stage2(parsed, stage1.path, digest)
    run_stage(stage2, progress, train)
    log.info("differential LoRA: %s (stage 1 %s, sha256 %s)", stage2.path, stage1.path, digest[:12])
    return stage2.path


def check_pairs(cfg: TrainConfig) -> None:
    """Every training subset must be a pair subset (before_dir); the pairs themselves are checked by the scan."""
    resolved = load_dataset_config(cfg.data.dataset_config, cfg.data.flags)
    for i, ds in enumerate(resolved.datasets):
        for j, sub in enumerate(ds.subsets):
            if sub.before_dir is None and not sub.is_reg:
                raise UserError(f"{resolved.path}: datasets[{i}].subsets[{j}]: no before_dir; a differential run "
                                "trains on pairs (image_dir = after images, before_dir = before images)")


def dry_run(parsed: ParsedArgs, opts: DifferentialOptions) -> str:
    """Both stages' plans (settings + the data plan of each side), without loading a model."""
    check_command(parsed)
    stage1 = plan_stage1(parsed, opts)
    stage2 = plan_stage2(parsed, stage1.path, None)
    check_pairs(stage2.train)
    lines = []
    if opts.pair_mode == "average":
        lines.append("--pair_mode average: each subset with before_dir is a group trained as below on its own pairs "
                     "(<X>_g<k>_stage1, <X>_g<k>); the result is their average")
    for st, what in ((stage1, "fit the before images (over-fit on purpose)"),
                     (stage2, "learn after - before: the after images on base + stage 1")):
        lines.append(f"stage {st.index}: {what} -> {st.path}")
        if st.train is None:
            lines.append("  given by --stage1_weights (not trained)")
            continue
        c = st.train
        length = f"{c.loop.max_train_epochs} epochs" if c.loop.max_train_epochs else f"{c.loop.max_train_steps} steps"
        lines.append(f"  {length}, "
                     f"lr {c.optimizer.unet_lr or c.optimizer.learning_rate:g} ({c.scheduler.lr_scheduler}), "
                     f"rank {c.network.network_dim or 4}, alpha {c.network.network_alpha:g}")
        lines.append(f"  base weights: {', '.join(c.network.base_weights) or 'none'}")
        lines.append("  images: " + ("each subset's before_dir (captions from image_dir)" if st.index == 1 else
                                     "each subset's image_dir (the after images)"))
        resolved = dataclasses.replace(load_dataset_config(c.data.dataset_config, c.data.flags),
                                       pair_side=c.data.pair_side)
        seed = c.loop.seed if c.loop.seed is not None else 42
        plan = make_plan(resolved, seed=seed, max_train_steps=c.loop.max_train_steps,
                         max_train_epochs=c.loop.max_train_epochs,
                         gradient_accumulation_steps=c.loop.gradient_accumulation_steps,
                         skip_bad_images=c.data.skip_bad_images, progress=False)
        lines += ["  " + ln for ln in format_plan(plan).splitlines()]
    return "\n".join(lines)
