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

A state of an older version has no `settings`: what can be known is read back from the kohya `ss_*` metadata
of the LoRA saved with it (`<name>.safetensors` beside `<name>-state`, or the one its manifest names) and
compared the same way; a note names the settings that could not be compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from library.errors import UserError
from library.flux.safetensors_io import read_metadata
from library.train.checkpoint import file_sha256
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


# setting -> (the LoRA metadata key that records it, its parser): what an older state can be compared by
_FROM_METADATA: dict[str, tuple[str, Callable[[str], Any]]] = {
    "optimizer_type": ("ss_optimizer", str), "learning_rate": ("ss_learning_rate", float),
    "unet_lr": ("ss_unet_lr", float), "text_encoder_lr": ("ss_text_encoder_lr", json.loads),
    "network_dim": ("ss_network_dim", int), "network_alpha": ("ss_network_alpha", float),
    "lr_scheduler": ("ss_lr_scheduler", str), "seed": ("ss_seed", int)}


def settings_of(cfg: TrainConfig, n_images: int) -> dict[str, Any]:
    """The settings a state records (JSON values)."""
    o, n, loop = cfg.optimizer, cfg.network, cfg.loop
    return {"optimizer_type": o.optimizer_type, "optimizer_args": list(o.optimizer_args),
            "learning_rate": o.learning_rate, "unet_lr": o.unet_lr, "text_encoder_lr": list(o.text_encoder_lr),
            "network_dim": n.network_dim, "network_alpha": n.network_alpha, "network_args": list(n.network_args),
            "lr_scheduler": cfg.scheduler.lr_scheduler, "train_batch_size": loop.train_batch_size,
            "gradient_accumulation_steps": loop.gradient_accumulation_steps, "seed": loop.seed,
            "dataset_config": cfg.data.dataset_config, "images": n_images}


def lora_of_state(state_dir: Path, train_state: dict[str, Any]) -> Path | None:
    """The .safetensors LoRA saved together with a state: the manifest's (when its sha256 still matches), else
    `<name>.safetensors` beside `<name>-state`; None when there is none."""
    manifest = train_state.get("lora") if isinstance(train_state.get("lora"), dict) else {}
    name = manifest.get("file") or (state_dir.name[: -len("-state")] + ".safetensors"
                                    if state_dir.name.endswith("-state") else "")
    lora = state_dir.parent / name
    if not name.endswith(".safetensors") or not lora.is_file():
        return None
    if manifest.get("sha256") and file_sha256(lora) != manifest["sha256"]:
        return None  # replaced by a later save of the same name
    return lora


def reconstruct_settings(state_dir: str | Path, train_state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The settings of a state without recorded `settings` (an older version), as far as the metadata of its
    LoRA tells, and a note naming the source and what could not be compared."""
    state_dir = Path(state_dir)
    lora, md = lora_of_state(state_dir, train_state), {}
    if lora is not None:
        try:
            md = read_metadata(lora)
        except UserError:
            md = {}
    found: dict[str, Any] = {}
    trained = "ss_learning_rate" in md  # training values present (not --no_metadata): an absent one was unset
    for key, (md_key, parse) in _FROM_METADATA.items():
        try:
            if md_key in md:
                found[key] = parse(md[md_key])
            elif trained and key == "unet_lr":
                found[key] = None
        except ValueError:
            pass  # a value another tool wrote differently: not compared
    missing = [("--" + k if k != "images" else "number of images") for k in POLICY if k not in found]
    source = f"the metadata of {lora.name}" if found else "no LoRA with kohya metadata beside it"
    note = (f"{state_dir}: --resume: this state was written by an older version (no 'settings' in "
            f"train_state.json); read from {source}: {', '.join('--' + k for k in found) or 'nothing'}; "
            f"could not be compared: {', '.join(missing)}")
    return found, note


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
