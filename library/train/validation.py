"""Validation loss on the held-out images of `validation_split` (kohya's --validate_every_n_steps/epochs).

The noise and σ of every validation image are the same at each evaluation (they are keyed by the
validation seed and the image, not the step), so the curve measures the LoRA, not the draw; kohya meant
to do this with fixed timesteps but its FLUX path ignores them (its §5.1). Captions are not shuffled or
dropped (the dataset layer's validation mode). Every rank evaluates its share; the mean is over all ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from library.train.inputs import make_inputs
from library.train.setup import Run
from library.train.step import flow_matching_loss

VALIDATION_STEP_KEY = -1  # the "step" the validation noise is keyed by: never a training step


def wants_validation(cfg: Any, step: int | None, epoch_end: int | None) -> bool:
    """At a step: every --validate_every_n_steps. At an epoch end: every --validate_every_n_epochs,
    or every epoch when neither flag is given (kohya's default)."""
    v = cfg.validation
    if step is not None:
        return bool(v.validate_every_n_steps) and step % v.validate_every_n_steps == 0
    if v.validate_every_n_epochs:
        return epoch_end % v.validate_every_n_epochs == 0
    return not v.validate_every_n_steps


def validation_loss(run: Run) -> float:
    """The mean flow-matching loss over the held-out batches (all ranks), inputs built as the training step's."""
    cfg, acc = run.cfg, run.accelerator
    seed = cfg.validation.validation_seed if cfg.validation.validation_seed is not None else run.seed
    total, count = torch.zeros((), dtype=torch.float64), 0
    run.network.eval()  # LoRA dropouts off
    try:
        with torch.no_grad():
            for i, batch in enumerate(run.val_loader.iter_epoch(0)):
                if cfg.validation.max_validation_steps is not None and i >= cfg.validation.max_validation_steps:
                    break
                loss = flow_matching_loss(run.models.transformer, make_inputs(run, batch), cfg.objective, seed,
                                          VALIDATION_STEP_KEY, run.models.guidance_embed,
                                          cfg.model.apply_t5_attn_mask, acc.autocast)
                total += float(loss)
                count += 1
    finally:
        run.network.train()
    stats = torch.tensor([float(total), float(count)], device=acc.device)
    if acc.num_processes > 1:
        stats = acc.reduce(stats, reduction="sum")
    return float(stats[0] / stats[1].clamp_min(1))
