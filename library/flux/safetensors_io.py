"""Strict safetensors reading: the one place checkpoint bytes enter the program.

Design note: a checkpoint is validated from its header before any tensor is touched, so a wrong file
(a pickle, an HTML error page saved as .safetensors, a download cut short) fails in milliseconds with a
one-line `UserError` naming the file. Tensors are then read through `safe_open`, which mmaps the file:
loaders stream one tensor at a time to the target device and dtype instead of materialising the whole
state dict in host memory first.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import safe_open
from safetensors.torch import save_file
import torch

from library.atomic import atomic_target
from library.errors import UserError

_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_MAX_HEADER = 100 * 1024 * 1024


def first_keys(keys, n: int = 3) -> str:
    """The first `n` of `keys` (sorted) for an error message, with how many more there are."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Return the safetensors header (tensor name → {dtype, shape, data_offsets}), without `__metadata__`.

    Raises `UserError` for a missing file, a pickle, a non-safetensors file or a truncated one.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(_PICKLE_MAGICS):
            raise UserError(
                f"{path}: is a pickle/PyTorch checkpoint; only .safetensors files are loaded "
                "(pickles can run arbitrary code) - convert it to safetensors first"
            )
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise UserError(f"{path}: not a safetensors file, or truncated (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end > data_len:
        raise UserError(f"{path}: truncated: tensors need {end} bytes of data but the file holds {data_len}")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors file (empty when absent)."""
    read_header(path)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


class Checkpoint:
    """Lazy view of one or more safetensors files (a single file or diffusers shards) as one mapping."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._where: dict[str, Path] = {}
        for file in files:
            for name, info in read_header(file).items():
                self.shapes[name] = tuple(info["shape"])
                self.dtypes[name] = info["dtype"]
                self._where[name] = file
        self._handles: dict[Path, object] = {}

    @property
    def name(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else str(self.files[0].parent)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        file = self._where[key]
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(file), framework="pt")
            handle.__enter__()
            self._handles[file] = handle
        try:
            return handle.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for corrupt data
            raise UserError(f"{file}: tensor {key!r} cannot be read ({err})") from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`, with the prefix removed."""
        return {k[len(prefix):]: self.get(k) for k in self.keys() if k.startswith(prefix)}


def shard_files(folder: Path, basename: str) -> list[Path] | None:
    """The files of `basename`.safetensors in `folder`, following a sharded `.index.json`; None if absent."""
    single = folder / f"{basename}.safetensors"
    if single.exists():
        return [single]
    index = folder / f"{basename}.safetensors.index.json"
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{index}: not a valid safetensors index (expected a JSON object with 'weight_map')") from None
    files = sorted({folder / name for name in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise UserError(f"{index}: shard file(s) missing: {', '.join(missing[:3])}")
    return files


@contextmanager
def open_checkpoint(files: Path | list[Path]) -> Iterator[Checkpoint]:
    ckpt = Checkpoint([files] if isinstance(files, Path) else list(files))
    try:
        yield ckpt
    finally:
        ckpt.close()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, flag: str, inputs: dict[str, str | os.PathLike | None]) -> Path:
    """Refuse an output path that is a folder or one of the inputs (a user's model or LoRA is never replaced)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory (given as {flag}); "
                        f"give a file name such as {path / 'out.safetensors'}")
    for in_flag, src in inputs.items():
        if src is not None and Path(src).exists() and path.exists() and os.path.samefile(path, src):
            raise UserError(f"{path}: {flag} is the same file as {in_flag}; write to a new file name "
                            "(the input is never overwritten)")
    return path


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .safetensors file name to write")
    # mkdir's OSError names the folder; callers / run_main report it
    with atomic_target(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        # safetensors creates files 0600; give the output the permissions any other file would get (umask)
        os.chmod(tmp, 0o666 & ~_umask())
