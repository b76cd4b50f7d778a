"""A batch of the dataset -> the step's `StepInputs` on the device: cached latents and text-encoder outputs,
or encoded now (no latent cache: the AE; no text-encoder cache: T5 without grad, CLIP-L with grad when its
LoRA is trained). The training step and the validation loss both build their inputs here.
"""

from __future__ import annotations

import torch

from library.data.dataset import Batch
from library.train.setup import Run
from library.train.step import StepInputs, sample_keys


def make_inputs(run: Run, batch: Batch) -> StepInputs:
    dev, cdtype = run.accelerator.device, run.dtypes.compute
    latents = _latents(run, batch.latents, batch.images)
    cond = _latents(run, batch.cond_latents, batch.cond_images)
    if batch.t5_out is not None:
        t5, pooled, mask = batch.t5_out, batch.clip_pooled, batch.t5_attn_mask
    else:
        t5, pooled, mask = encode_live(run, list(batch.captions))
    weights = torch.where(batch.is_reg.bool(), torch.tensor(run.cfg.objective.prior_loss_weight), torch.tensor(1.0))
    return StepInputs(latents=latents, t5_out=t5.to(dev, cdtype), clip_pooled=pooled.to(dev, cdtype),
                      t5_attn_mask=mask.to(dev), sample_weights=weights.to(dev),
                      loss_mask=None if batch.loss_mask is None else batch.loss_mask.to(dev),
                      keys=sample_keys(list(batch.paths)), cond_latents=cond)


def _latents(run: Run, cached: torch.Tensor | None, images: torch.Tensor | None) -> torch.Tensor | None:
    """Float32 latents on the device: from the cache, or encoded now by the AE (no latent cache)."""
    if cached is not None:
        return cached.to(run.accelerator.device, torch.float32)
    if images is None:
        return None
    ae = run.models.ae
    with torch.no_grad():
        return ae.encode(images.to(run.accelerator.device, next(ae.parameters()).dtype)).float()


def encode_live(run: Run, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text conditioning at the step: T5 without grad; CLIP-L with grad when its LoRA is trained."""
    text, m = run.models.text, run.models
    clip_ids, t5_ids, t5_mask = text.tokenize(captions, m.t5_max_length)
    dev = text.device
    with torch.no_grad():
        mask = t5_mask.to(dev) if run.cfg.model.apply_t5_attn_mask else None
        t5 = text.t5(t5_ids.to(dev), attention_mask=mask).last_hidden_state
    with torch.set_grad_enabled(run.train_clip), run.accelerator.autocast():
        pooled = text.clip(clip_ids.to(dev)).pooler_output
    return t5, pooled, t5_mask
