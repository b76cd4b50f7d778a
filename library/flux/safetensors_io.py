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
import torch

from library.atomic import write_bytes_atomic
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
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(f"{path}: not a valid safetensors file (__metadata__ must map names to strings)")
    data_len = size - 8 - n
    end = max((check_entry(path, name, info) for name, info in header.items()), default=0)
    if end > data_len:
        raise UserError(f"{path}: truncated: tensors need {end} bytes of data but the file holds {data_len}")
    return header


_ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_entry(path: Path, name: str, info: object) -> int:
    """One header entry is {dtype, shape, data_offsets} with a known dtype and consistent sizes; returns its end."""
    where = f"{path}: not a valid safetensors file: tensor {name!r}"
    if not isinstance(info, dict):
        raise UserError(f"{where}: expected {{dtype, shape, data_offsets}}, got {type(info).__name__}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEM_SIZE:
        raise UserError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise UserError(f"{where}: 'shape' must be a list of sizes, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                    for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{where}: 'data_offsets' must be [begin, end], got {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _ITEM_SIZE[dtype]:
        raise UserError(f"{where}: shape {shape} of {dtype} needs {numel * _ITEM_SIZE[dtype]} bytes, data_offsets "
                        f"give {offsets[1] - offsets[0]}")
    return offsets[1]


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


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")  # safetensors' Dtype enum order


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
              ) -> tuple[int, Iterator[bytes | memoryview]]:
    """(file size, chunks) of a safetensors file, produced one tensor at a time (nothing is held twice, no
    temporary file of safetensors' own): 8-byte header length, the JSON header padded to 8 bytes, the data."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
    # safetensors' own order (widest dtype first, then by name), so the bytes equal safetensors.torch.save's
    tensors = dict(sorted(tensors.items(), key=lambda kv: (-_DTYPE_ORDER.index(_DTYPE_NAMES[kv[1].dtype]), kv[0])))
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def chunks() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(raw)) + raw
        for t in tensors.values():
            if t.numel():
                yield memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())

    return 8 + len(raw) + offset, chunks()


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file to a temporary name beside `path`, then rename it into place; returns its size.
    A full disk is a one-line `UserError` naming `path` and the space needed (checked before writing)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .safetensors file name to write")
    size, chunks = serialize(tensors, metadata)
    # mkdir's OSError names the folder; callers / run_main report it
    write_bytes_atomic(path, chunks, needed=size)
    return size
