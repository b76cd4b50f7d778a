"""Atomic file writes: every output goes to a temporary name beside its target and is renamed into place,
so a crash or a full disk never leaves a half-written LoRA, cache entry, image or config behind.

Design note: every byte the program writes passes through `_write` (one seam, so tests can simulate a
full disk without a small mount), every temporary is named `.<target name>.tmp<pid>` (so a later run can
recognise its own leftovers and nobody else's: `is_our_temporary`), and a full disk becomes one
`UserError` naming the file, the space the write needed and the space that was free.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from library.errors import UserError

# `.<name>.tmp<pid>` (a file or folder being written) and `.<name>.old<pid>` (a folder being replaced)
# (a staged LoRA keeps its extension after the pid, `.<name>.tmp<pid><ext>`, so its writer picks the format)
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)(?P<ext>\.[A-Za-z0-9]+)?$")
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos",
                   "PytorchStreamWriter failed writing")


def temp_name(path: str | os.PathLike, kind: str = "tmp", keep_suffix: bool = False) -> Path:
    """The temporary name beside `path` that this process writes (or parks an old folder) under."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}{os.getpid()}{path.suffix if keep_suffix else ''}")


def parse_temporary(name: str) -> tuple[str, str, int] | None:
    """(target name, "tmp" | "old", pid) for one of our temporary names, else None."""
    m = _OURS.match(name)
    return (m.group("name"), m.group("kind"), int(m.group("pid"))) if m else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier process with the same id (containers reuse pids)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT as OSError, or as the text of the errors safetensors and torch.save raise for it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t in str(err) for t in _DISK_FULL_TEXT)


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def free_bytes(path: str | os.PathLike) -> int:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def disk_full_error(path: str | os.PathLike, needed: int | None) -> UserError:
    need = f"needs {mb(needed)}" if needed else "ran out of space"
    return UserError(f"{path}: disk full: the write {need}, {mb(free_bytes(Path(path).parent))} free on that drive; "
                     "free some space (or choose another folder) and run again; nothing was replaced")


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """Refuse a write of `needed` bytes before starting it when the drive cannot hold it."""
    if free_bytes(Path(path).parent) < needed:
        raise disk_full_error(path, needed)


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail now, not after minutes of work, if files could not be created in `folder` (which need not exist
    yet: its nearest existing parent decides). `what` opens each message, e.g. "out/: --output_dir".
    Nothing is created here."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} is not a folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} is not writable ({existing}: permission denied)")


def _write(f: io.BufferedWriter, data: bytes | memoryview) -> None:
    """The one place bytes reach a file (tests replace it to simulate a full disk)."""
    f.write(data)


def write_chunks(path: Path, chunks: Iterable[bytes | memoryview], fsync: bool = False) -> None:
    """Write `chunks` to `path` (a temporary; no rename), optionally flushed to the disk."""
    with open(path, "wb") as f:
        for chunk in chunks:
            _write(f, chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` survive a power loss (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_target(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder is created); when the block ends without an error
    the temporary file replaces `path`, otherwise it is removed. A full disk becomes a `UserError` naming
    `path` and `needed` bytes (when known).

    Power loss: the file is flushed to the disk before the rename and the folder after it, so once this
    returns `path` survives a power cut with its new content, and before that it keeps the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except UserError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(path, needed) from None
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            remove_path(tmp)


def write_bytes_atomic(path: str | os.PathLike, chunks: Iterable[bytes | memoryview] | bytes,
                       needed: int | None = None) -> Path:
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        needed, chunks = len(chunks), [chunks]
    if needed:
        check_free_space(path, needed)
    with atomic_target(path, needed) as tmp:
        write_chunks(tmp, chunks)  # flushed to the disk by atomic_target
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
