"""The step/epoch schedule of a run: the one formula the trainer, --dry_run, the caches and the metadata share.

kohya's arithmetic: an epoch is every batch of every dataset once; each of `num_processes` ranks takes
`ceil(batches / num_processes)` of them, and an optimizer step consumes `gradient_accumulation_steps` of a
rank's batches, the micro-batches left over at the end of an epoch making one more step. So an epoch has
`ceil(batches_per_rank / accumulation)` steps; `--max_train_epochs` sets the total to epochs x that, and
`--max_train_steps` needs `ceil(total / steps_per_epoch)` epochs (the last one stops early).
`--save_n_epoch_ratio N` saves every `floor(epochs / N) or 1` epochs (about N saves over the run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_TRAIN_STEPS = 1600  # kohya's default of --max_train_steps


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # optimizer steps of the whole run
    epochs: int  # epochs the loop enters (the last may stop before its end)
    steps_per_epoch: int  # optimizer steps of a full epoch on each rank
    save_every_n_epochs: int | None  # --save_every_n_epochs, or derived from --save_n_epoch_ratio


def batches_per_rank(batches: int, num_processes: int = 1) -> int:
    """Each rank's share of an epoch's batches (the last ones are repeated so every rank steps equally)."""
    return math.ceil(batches / num_processes)


def make_schedule(batches_per_rank: int, gradient_accumulation_steps: int = 1,
                  max_train_steps: int = DEFAULT_MAX_TRAIN_STEPS, max_train_epochs: int | None = None,
                  save_every_n_epochs: int | None = None, save_n_epoch_ratio: int | None = None) -> Schedule:
    per_epoch = math.ceil(batches_per_rank / gradient_accumulation_steps)
    if max_train_epochs:
        epochs, total = max_train_epochs, max_train_epochs * per_epoch
    else:
        total = max_train_steps
        epochs = math.ceil(total / per_epoch) if per_epoch else 0
    if save_n_epoch_ratio:  # kohya: the ratio replaces --save_every_n_epochs
        save_every_n_epochs = math.floor(epochs / save_n_epoch_ratio) or 1
    return Schedule(total, epochs, per_epoch, save_every_n_epochs)


def epochs_from(schedule: Schedule, batches_per_rank: int, gradient_accumulation_steps: int, epoch: int,
                index: int, global_step: int) -> int:
    """Epochs the loop must enter to finish `schedule` when it starts at batch `index` of `epoch` with
    `global_step` steps done (a resumed run; with another number of processes an epoch has other steps)."""
    remaining = schedule.total_steps - global_step
    if remaining <= 0 or not schedule.steps_per_epoch:
        return max(schedule.epochs, epoch)
    left = math.ceil(max(0, batches_per_rank - index) / gradient_accumulation_steps)  # steps left in `epoch`
    if remaining <= left:
        return max(schedule.epochs, epoch + 1)
    return max(schedule.epochs, epoch + 1 + math.ceil((remaining - left) / schedule.steps_per_epoch))
