"""One training run per output folder: an exclusive lock on `<output_dir>/.lock`.

Design note: the lock is an `flock` on the file, which the kernel releases when the holder exits, however
it exits (kill -9 included), so a lock file left by a dead run is simply taken over: no pid guessing
decides whether a run is alive. The file holds the holder's pid, host and start time for the message the
second run prints. Only rank 0 of a multi-process run takes it (all ranks write through rank 0).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from library.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(folder: Path) -> int | None:
    """Take the lock (a file descriptor to keep open), or raise UserError naming the run that holds it.
    None where the file system has no locks (some network/FUSE mounts): the run goes on, with a warning."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        stale = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{folder}: another training run ({_holder(path)}) is writing to this --output_dir; "
                            f"wait for it to finish or choose another --output_dir (lock: {path})") from None
        except OSError as err:  # ENOLCK / EOPNOTSUPP: no locking on this file system
            os.close(fd)
            log.warning("%s: cannot lock the output folder (%s); make sure no other run writes here", path,
                        err.strerror or err)
            return None
        # The file may have been removed (released) by its holder between our open and flock: retry then.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if stale:
        log.info("%s: took over the lock of a run that is no longer running (%s)", path, _holder(path))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode("utf-8"))
    return fd


def release(folder: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        (folder / LOCK_NAME).unlink(missing_ok=True)
    finally:
        os.close(fd)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[bool]:
    """Hold the output folder's lock for the block (rank 0 only); yields whether this process holds it."""
    if not _is_main_process():
        yield False
        return
    folder = Path(folder)
    fd = acquire(folder)
    try:
        yield True
    finally:
        release(folder, fd)
