"""Start-up clean-up of what killed runs left in the output folder: only our own temporaries.

Ours are recognisable by name: `.<target>.tmp<pid>` (a file or state folder being written) and
`.<target>.old<pid>` (a state folder being replaced), written by a process that no longer runs. Before
anything is deleted, a save that was killed between its renames is completed: a complete state folder
whose target is missing is put back under its name (the newest step wins), and a staged LoRA whose sha256
the published state's manifest names is renamed into place. Everything else of ours is removed; nothing
without our naming is touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from library.atomic import parse_temporary, pid_alive, remove_path
from library.train import checkpoint as C

log = logging.getLogger(__name__)


def dead_temporaries(folder: Path) -> list[Path]:
    """Our temporaries in `folder` (not recursive) whose writer no longer runs."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        parsed = parse_temporary(p.name)
        if parsed and not pid_alive(parsed[2]):
            out.append(p)
    return sorted(out)


def _recover_states(folder: Path, leftovers: list[Path]) -> list[str]:
    done = []
    targets = {parse_temporary(p.name)[0] for p in leftovers if p.is_dir()}  # type: ignore[index]
    for name in sorted(targets):
        target = folder / name
        if target.exists():
            continue
        copies = [c for c in C.interrupted_copies(target) if c in leftovers]
        if copies:
            os.replace(copies[0], target)
            done.append(f"{target.name} (from {copies[0].name})")
    return done


def _recover_loras(folder: Path, leftovers: list[Path]) -> list[str]:
    done = []
    for p in leftovers:
        name = parse_temporary(p.name)[0]  # type: ignore[index]
        if not p.is_file() or parse_temporary(p.name)[1] != "tmp":  # type: ignore[index]
            continue
        state = C.Names.state_of(folder / name)
        if not C.is_complete_state(state):
            continue
        manifest = C.read_train_state(state).get("lora") or {}
        target = folder / name
        if manifest.get("file") == name and manifest.get("sha256") == C.file_sha256(p) and \
                (not target.is_file() or C.file_sha256(target) != manifest["sha256"]):
            os.replace(p, target)
            done.append(name)
    return done


def clean_output_folder(folder: str | os.PathLike) -> None:
    """Complete interrupted saves, then remove our dead temporaries (top level and the sample folder)."""
    folder = Path(folder)
    leftovers = dead_temporaries(folder)
    recovered = _recover_states(folder, leftovers)
    leftovers = [p for p in leftovers if p.exists() or p.is_symlink()]
    recovered += _recover_loras(folder, leftovers)
    if recovered:
        log.warning("%s: completed a save a killed run had left half-renamed: %s", folder, ", ".join(recovered))
    removed = [p for p in dead_temporaries(folder) + dead_temporaries(folder / "sample")]
    size = 0
    for p in removed:
        size += sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        remove_path(p)
    if removed:
        log.warning("%s: removed %d temporary file(s)/folder(s) of killed runs (%.1f MB): %s", folder, len(removed),
                    size / 2**20, ", ".join(p.name for p in removed[:4]) + (" ..." if len(removed) > 4 else ""))
