"""Saving LoRAs and training states, their kohya names, pruning old ones, and resuming.

Names are kohya's: `<name>-<epoch:06d>.safetensors` (epoch saves), `<name>-step<step:08d>.safetensors`
(step saves), `<name>.safetensors` (final), and `…-state` directories beside them.

A state directory is our own format (kohya's is accelerate's, tied to its hooks): the LoRA parameters in
float32 (`network.safetensors`), `optimizer.pt`, `scheduler.pt`, every rank's RNG states (`rng.pt`) and
`train_state.json` (global step, epoch, data position, loss history). Together with the data order and
the noise, which are pure functions of (seed, epoch, step), that makes a resumed run continue exactly
like the uninterrupted one. A state is written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError

STATE_FILES = ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "train_state.json")


@dataclass(frozen=True)
class Names:
    output_dir: Path
    output_name: str | None
    ext: str  # ".safetensors" | ".pt" | ".ckpt"

    def epoch(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}{self.ext}"

    def step(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}{self.ext}"

    def final(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}{self.ext}"

    @staticmethod
    def state_of(lora: Path) -> Path:
        return lora.with_name(lora.name[: -len(lora.suffix)] + "-state")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, network_sd: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
               rng_states: list[dict[str, Any]], train_state: dict[str, Any]) -> Path:
    """Write a state directory atomically (tmp dir + rename; an older one of the same name is replaced)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in network_sd.items()},
              str(tmp / "network.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1), encoding="utf-8")
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


@dataclass
class LoadedState:
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]
    train_state: dict[str, Any]


def load_state(path: str | Path) -> LoadedState:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: --resume: not a state directory (expected a '...-state' folder)")
    missing = [f for f in STATE_FILES if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path}: --resume: missing {', '.join(missing)}; is this a state written by this trainer?")
    return LoadedState(
        network=load_file(str(path / "network.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        scheduler=torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        train_state=json.loads((path / "train_state.json").read_text(encoding="utf-8")),
    )


def saved_position(path: str | Path) -> tuple[dict[str, Any], int, int]:
    """(data position, number of processes that wrote it, global step) of a state, without loading it all."""
    loaded_ts = json.loads((Path(path) / "train_state.json").read_text(encoding="utf-8"))
    world = len(torch.load(Path(path) / "rng.pt", map_location="cpu", weights_only=False))
    return loaded_ts["loader"], world, int(loaded_ts["global_step"])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def prune_epochs(names: Names, epoch: int, every: int, keep: int | None, state_keep: int | None) -> None:
    """--save_last_n_epochs(_state): drop the save made `keep` saves ago (kohya's rule)."""
    if keep:
        old = epoch - every * keep
        if old > 0:
            _remove(names.epoch(old))
    keep_state = state_keep or keep
    if keep_state:
        old = epoch - every * keep_state
        if old > 0:
            _remove(Names.state_of(names.epoch(old)))


def prune_steps(names: Names, step: int, keep_steps: int | None, state_keep_steps: int | None) -> None:
    """--save_last_n_steps(_state): drop step saves made `keep_steps` or more steps ago."""
    pattern = re.compile(re.escape(names.output_name or "at") + r"-step(\d{8})(-state|" + re.escape(names.ext) + ")$")
    for path in names.output_dir.iterdir() if names.output_dir.is_dir() else []:
        m = pattern.match(path.name)
        if not m:
            continue
        limit = state_keep_steps or keep_steps if m.group(2) == "-state" else keep_steps
        if limit and step - int(m.group(1)) >= limit:
            _remove(path)


def convert_loader_position(position: dict[str, Any], saved_world: int, world: int) -> tuple[dict[str, Any], str | None]:
    """A data position written by `saved_world` processes, for a run of `world` processes, and a note of what
    changed (None when nothing did).

    Each rank's `index` counts its own batches, rank r taking the epoch's batches r, r + N, ...; after index i
    the N ranks have taken the epoch's first i * N batches. The new index starts at the same place, rounded
    down, so at most world - 1 batches of the epoch are seen twice and none is skipped.
    """
    if saved_world == world:
        return position, None
    done = int(position["index"]) * saved_world
    index = done // world
    again = done - index * world
    rng = f"; ranks {saved_world}..{world - 1} start from rank 0's RNG state" if world > saved_world else ""
    note = (f"--resume: this state was written by {saved_world} processes and this run has {world}: the data "
            f"position (epoch {int(position['epoch']) + 1}, {done} batches done) continues at batch {index * world}"
            + (f" ({again} seen again)" if again else "")
            + f"; the global batch is {world}x the per-process batch instead of {saved_world}x{rng}. Training "
            "continues correctly, but not bit for bit like the uninterrupted run")
    return {**position, "index": index}, note
