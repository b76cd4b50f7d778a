"""What a `--resume` keeps from the state and what it takes from the command line, and the check of both.

Kept from the state (the optimizer and the schedule continue exactly): the LoRA weights, the optimizer's
state and hyper-parameters (learning rates, betas, weight decay: `optimizer.load_state_dict` restores its
param groups), the LR scheduler's position and base learning rates, the RNG states, the data position
and the loss history. Taken from the command line: everything else (network_alpha, the dataset, batch
size, gradient accumulation, the step count, the schedule's shape, saving and sampling flags).

A state records the settings it was trained with (`settings` in train_state.json); a resume compares them
with the new run's and prints one warning per difference naming both values and which one is used, or
refuses where continuing cannot work (another optimizer: its state has other slots). The LoRA metadata then
records the values actually used (`ss_learning_rate` is the state's when the state's rate is kept).
"""

from __future__ import annotations

import json
from typing import Any

from library.errors import UserError
from library.train.config import TrainConfig

# setting -> (kept from the state?, what the difference means)
POLICY: dict[str, tuple[bool, str]] = {
    "learning_rate": (True, "the optimizer and LR schedule continue with the state's learning rate"),
    "unet_lr": (True, "the optimizer continues with the state's learning rates"),
    "text_encoder_lr": (True, "the optimizer continues with the state's learning rates"),
    "optimizer_args": (True, "the optimizer's hyper-parameters come from the state"),
    "network_alpha": (False, "the restored weights are scaled by the new alpha/rank, so the LoRA's effect changes"),
    "network_args": (False, "the new network arguments apply to the restored weights"),
    "lr_scheduler": (False, "the new schedule's shape continues from the state's step"),
    "train_batch_size": (False, "the data position was counted in the state's batches"),
    "gradient_accumulation_steps": (False, "the data position was counted in the state's batches"),
    "seed": (False, "data order and noise follow the new seed from here on"),
    "dataset_config": (False, "training continues on another dataset"),
    "images": (False, "the dataset changed; the data position may skip or repeat images"),
}
# Metadata keys that must record the state's value when the state's value is what training uses.
_METADATA = {"learning_rate": "ss_learning_rate", "unet_lr": "ss_unet_lr", "text_encoder_lr": "ss_text_encoder_lr"}


def settings_of(cfg: TrainConfig, n_images: int) -> dict[str, Any]:
    """The settings a state records (JSON values)."""
    o, n, loop = cfg.optimizer, cfg.network, cfg.loop
    return {"optimizer_type": o.optimizer_type, "optimizer_args": list(o.optimizer_args),
            "learning_rate": o.learning_rate, "unet_lr": o.unet_lr, "text_encoder_lr": list(o.text_encoder_lr),
            "network_dim": n.network_dim, "network_alpha": n.network_alpha, "network_args": list(n.network_args),
            "lr_scheduler": cfg.scheduler.lr_scheduler, "train_batch_size": loop.train_batch_size,
            "gradient_accumulation_steps": loop.gradient_accumulation_steps, "seed": loop.seed,
            "dataset_config": cfg.data.dataset_config, "images": n_images}


def check_optimizer_matches(saved: dict[str, Any] | None, optimizer_type: str, where: str) -> None:
    """Refuse a resume with another optimizer (before any model is loaded)."""
    if saved and saved.get("optimizer_type") and saved["optimizer_type"] != optimizer_type:
        raise UserError(f"{where}: --resume: the state was trained with --optimizer_type {saved['optimizer_type']}, "
                        f"this run asks for {optimizer_type}; its optimizer state cannot be used by another "
                        f"optimizer: resume with --optimizer_type {saved['optimizer_type']}, or start a new run "
                        "with --network_weights <the LoRA> instead of --resume")


def check_param_groups(saved_groups: list[dict[str, Any]], current_groups: list[dict[str, Any]], where: str) -> None:
    """States without recorded settings: another optimizer shows as other hyper-parameter names."""
    # bookkeeping and implementation switches that differ between torch versions, not between optimizers
    ignore = {"params", "initial_lr", "name", "foreach", "maximize", "capturable", "differentiable", "fused",
              "decoupled_weight_decay"}
    if saved_groups and current_groups:
        a, b = set(saved_groups[0]) - ignore, set(current_groups[0]) - ignore
        if a != b:
            raise UserError(f"{where}: --resume: the optimizer state was written by another optimizer (its settings "
                            f"{sorted(a - b)[:4]} are unknown to this one, {sorted(b - a)[:4]} missing); resume "
                            "with the optimizer of the interrupted run")


def compare(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> list[str]:
    """One warning per changed setting, naming both values and which one is used."""
    if not saved:
        return []
    out = []
    for key, (kept, why) in POLICY.items():
        if key in saved and saved[key] != now.get(key):
            used = "the state's value is used" if kept else "the new value is used"
            flag = f"--{key}" if key != "images" else "number of images"
            out.append(f"{where}: --resume: {flag} is {_show(now.get(key))} now, {_show(saved[key])} in the state; "
                       f"{used}: {why}")
    return out


def metadata_overrides(saved: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, str]:
    """ss_* metadata values to replace so that the metadata records what training used."""
    if not saved:
        return {}
    out = {}
    for key, md_key in _METADATA.items():
        if key in saved and saved[key] != now.get(key) and saved[key] not in (None, []):
            value = saved[key]
            out[md_key] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def _show(v: Any) -> str:
    if isinstance(v, list):
        return " ".join(map(str, v)) or "(none)"
    return "(unset)" if v is None else str(v)
