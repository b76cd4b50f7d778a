"""Saving LoRAs and training states, their kohya names, pruning old ones, and resuming.

Names are kohya's: `<name>-<epoch:06d>.safetensors` (epoch saves), `<name>-step<step:08d>.safetensors`
(step saves), `<name>.safetensors` (final), and `…-state` directories beside them.

A state directory is our own format (kohya's is accelerate's, tied to its hooks): the LoRA parameters in
float32 (`network.safetensors`), `optimizer.pt`, `scheduler.pt`, every rank's RNG states (`rng.pt`) and
`train_state.json` (global step, epoch, data position, loss history). Together with the data order and
the noise, which are pure functions of (seed, epoch, step), that makes a resumed run continue exactly
like the uninterrupted one. A state is written to a temporary directory and renamed into place.

A save replaces a LoRA and its state together or not at all (`save_checkpoint`): both are written whole
under temporary names, then renamed; train_state.json records the LoRA's name and sha256. A kill between
the renames leaves complete copies under `.<name>.tmp<pid>` / `.<name>.old<pid>`, which `--resume` and the
next start (library/train/leftovers.py) find and put back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from library.atomic import (check_free_space, disk_full_error, fsync_dir, fsync_file, is_disk_full,
                            parse_temporary, remove_path, temp_name, write_chunks)
from library.errors import UserError
from library.flux.safetensors_io import read_header, serialize

log = logging.getLogger(__name__)

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


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state_payload(network_sd: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
                  rng_states: list[dict[str, Any]], train_state: dict[str, Any]) -> dict[str, tuple[int, Any]]:
    """{file name: (size, chunks)} of a state directory, serialized in memory (a LoRA's state is small), so
    the space a save needs is known before anything is written. train_state.json comes last: a directory
    holding it (and the others) is complete."""
    net = {k: v.detach().float().contiguous().cpu() for k, v in network_sd.items()}
    out: dict[str, tuple[int, Any]] = {"network.safetensors": serialize(net)}
    for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict()),
                      ("rng.pt", rng_states)):
        data = _torch_bytes(obj)
        out[name] = (len(data), [data])
    data = json.dumps(train_state, indent=1).encode("utf-8")
    out["train_state.json"] = (len(data), [data])
    return out


def write_state_dir(stage: Path, payload: dict[str, tuple[int, Any]], target: Path) -> None:
    """Write a complete state directory under `stage` (flushed to the disk; not yet visible as `target`)."""
    remove_path(stage)
    stage.mkdir(parents=True)
    for name, (size, chunks) in payload.items():
        try:
            write_chunks(stage / name, chunks, fsync=True)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(target, sum(s for s, _ in payload.values())) from None
            raise
    fsync_dir(stage)


def _rename(src: Path, dst: Path) -> None:
    """Every rename of a save goes through here (the fault-injection tests stop the process at each one)."""
    os.replace(src, dst)


def _swap_dir(stage: Path, path: Path) -> None:
    """Put the complete folder `stage` in place of `path`. Between the two renames only `.<name>.old<pid>`
    and `.<name>.tmp<pid>` exist, both complete: `find_complete_state` and the start-up clean-up use them."""
    if path.exists():
        old = temp_name(path, "old")
        remove_path(old)
        _rename(path, old)
        _rename(stage, path)
        fsync_dir(path.parent)
        remove_path(old)
    else:
        _rename(stage, path)
        fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class StateParts:
    network_sd: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    rng_states: list[dict[str, Any]]
    train_state: dict[str, Any]


def save_checkpoint(lora_path: Path, write_lora: Callable[[Path], None], state: StateParts | None) -> None:
    """Write a LoRA (and its state directory) so that both are replaced together or not at all: both are
    written completely under temporary names first (a full disk stops here, with nothing replaced and no
    temporary left), then the state is swapped in, then the LoRA. The state's train_state.json names the
    LoRA and its sha256 (the manifest that says which LoRA belongs to it)."""
    lora_stage = temp_name(lora_path, keep_suffix=True)  # the writer picks the format by the extension
    state_path = Names.state_of(lora_path)
    state_stage = temp_name(state_path)
    try:
        write_lora(lora_stage)
        fsync_file(lora_stage)  # on the disk before any rename (power loss)
        if state is not None:
            manifest = {"lora": {"file": lora_path.name, "sha256": file_sha256(lora_stage)}}
            payload = state_payload(state.network_sd, state.optimizer, state.scheduler, state.rng_states,
                                    {**state.train_state, **manifest})
            needed = sum(size for size, _ in payload.values())
            check_free_space(state_path, needed)
            write_state_dir(state_stage, payload, state_path)
            _swap_dir(state_stage, state_path)
        _rename(lora_stage, lora_path)
        fsync_dir(lora_path.parent)
    finally:
        remove_path(lora_stage)
        remove_path(state_stage)


def save_state(path: Path, network_sd: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
               rng_states: list[dict[str, Any]], train_state: dict[str, Any]) -> Path:
    """Write a state directory on its own (complete under a temporary name, then swapped into place)."""
    payload = state_payload(network_sd, optimizer, scheduler, rng_states, train_state)
    check_free_space(path, sum(size for size, _ in payload.values()))
    stage = temp_name(path)
    try:
        write_state_dir(stage, payload, path)
        _swap_dir(stage, path)
    finally:
        remove_path(stage)
    return path


@dataclass
class LoadedState:
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]
    train_state: dict[str, Any]


def read_train_state(path: Path) -> dict[str, Any]:
    """train_state.json of a state directory, checked for the keys a resume needs."""
    file = path / "train_state.json"
    try:
        ts = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{file}: --resume: damaged or truncated ({type(err).__name__}); resume from an earlier "
                        "state, or start again without --resume") from None
    problems = [] if isinstance(ts, dict) else ["not a JSON object"]
    if not problems:
        if not isinstance(ts.get("global_step"), int) or ts["global_step"] < 0:
            problems.append("'global_step' (a step count) is missing")
        loader = ts.get("loader")
        if not (isinstance(loader, dict) and isinstance(loader.get("epoch"), int)
                and isinstance(loader.get("index"), int)):
            problems.append("'loader' (epoch, index) is missing")
        if not isinstance(ts.get("record"), dict):
            problems.append("'record' (the loss history) is missing")
    if problems:
        raise UserError(f"{file}: --resume: not a train state written by this trainer: {'; '.join(problems)}")
    return ts


def is_complete_state(path: Path) -> bool:
    if not path.is_dir() or any(not (path / f).is_file() for f in STATE_FILES):
        return False
    try:
        read_train_state(path)
    except UserError:
        return False
    return True


def interrupted_copies(path: Path) -> list[Path]:
    """Complete state folders a save interrupted between its renames left beside `path`, newest step first."""
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.iterdir():
        parsed = parse_temporary(p.name)
        if parsed and parsed[0] == path.name and is_complete_state(p):
            found.append((read_train_state(p)["global_step"], p.stat().st_mtime, p))
    return [p for _, _, p in sorted(found, reverse=True)]


def resolve_state_dir(path: str | Path) -> Path:
    """The state folder --resume reads: `path`, or the newest complete copy an interrupted save left."""
    path = Path(path)
    if not path.exists():
        copies = interrupted_copies(path)
        if copies:
            log.warning("%s: --resume: not found; a save was interrupted between two renames: resuming from "
                        "the complete copy %s", path, copies[0])
            return copies[0]
    if not path.is_dir():
        raise UserError(f"{path}: --resume: not a state directory (expected a '...-state' folder)")
    missing = [f for f in STATE_FILES if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path}: --resume: missing {', '.join(missing)}; is this a state written by this trainer?")
    return path


def _load_pt(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated zip, a cut pickle, garbage: torch raises many types
        raise UserError(f"{file}: --resume: damaged or truncated ({type(err).__name__}); resume from an earlier "
                        "state, or start again without --resume") from None


def load_state(path: str | Path) -> LoadedState:
    path = resolve_state_dir(path)
    train_state = read_train_state(path)
    net_file = path / "network.safetensors"
    try:
        read_header(net_file)  # one line for a truncated or foreign file
    except UserError as err:
        raise UserError(f"{err}; --resume: resume from an earlier state") from None
    try:
        network = load_file(str(net_file))
    except Exception as err:  # SafetensorError for a damaged body
        raise UserError(f"{net_file}: --resume: damaged ({err}); resume from an earlier state") from None
    return LoadedState(network=network, optimizer=_load_pt(path / "optimizer.pt"),
                       scheduler=_load_pt(path / "scheduler.pt"), rng=_load_pt(path / "rng.pt"),
                       train_state=train_state)


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
