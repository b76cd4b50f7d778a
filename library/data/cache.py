"""Latent and text-encoder output cache, keyed by a content hash of everything that produced an entry.

Design note. kohya names a latent file after the image and checks only that the expected keys exist, and it
names a text-encoder file after the image without recording the caption, the token length or the encoder:
edit a caption or swap a model and stale outputs are used silently. Here every entry's name *is* a hash of
its inputs:
  latents: image bytes, bucket size, resize size, crop box, flip_aug, alpha-mask setting, interpolation,
           conditioning image bytes (Kontext / mask) or a degraded control image's drawn parameters, AE identity;
  text:    the exact caption string, encoder identity, T5 max length, T5 attention-mask setting.
So a changed input simply misses and is re-encoded, an unchanged one hits, and entries are shared by any
subsets, datasets or runs that produce the same thing. Because text entries are keyed by the caption
string, caption dropout, shuffling and wildcards work with cached outputs: the caller enumerates the
caption variants the run will actually use (plus "" for dropout) and caches each once.

This module is the store only (keys, entries, identities); library/train/caching.py runs the encoders over
a dataset's items and puts the entries here.

On disk an entry is one safetensors file `<root>/<kind>/<key[:2]>/<key>.safetensors`, written to a
temporary name and renamed, so a killed caching run leaves only whole entries and the next run encodes
just what is missing. --skip_cache_check trusts an existing file without reading its header, and trusts
a file-size/mtime index instead of re-hashing image bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from safetensors.torch import load_file
import torch

from library.atomic import parse_temporary, pid_alive, write_text_atomic
from library.errors import UserError
from library.flux.safetensors_io import read_header, save_file_atomic

CACHE_VERSION = "flux-cache-1"  # bump when an entry's layout or the preprocessing changes
_SAMPLE = 1 << 16  # bytes sampled from a checkpoint body for its identity


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(path: str | os.PathLike) -> str:
    """Identity of a model file or folder: safetensors header + size + three sampled 64 KiB body chunks.

    Unlike path+mtime it survives copying; unlike the header alone it changes when weights are
    fine-tuned in place with the same layout. Reads ~200 KiB per file, even for a 24 GB checkpoint.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no .safetensors files to identify")
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else 0
            head = f.read(min(n, size))
            h.update(p.name.encode() + size.to_bytes(8, "little") + head)
            for pos in (8 + n, (size + 8 + n) // 2, max(8 + n, size - _SAMPLE)):
                f.seek(min(pos, size))
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def latent_key(image_digest: str, bucket: tuple[int, int], resized: tuple[int, int],
               crop: tuple[int, int, int, int], flip_aug: bool, alpha_mask: bool, interpolation: str | None,
               ae_id: str, cond_digest: str | None = None, cond_role: str | None = None) -> str:
    return _hash("latent", image_digest, bucket, resized, crop, flip_aug, alpha_mask, interpolation, ae_id,
                 cond_digest, cond_role)


def text_key(caption: str, te_id: str, t5_max_length: int, apply_t5_attn_mask: bool) -> str:
    return _hash("text", caption, te_id, t5_max_length, apply_t5_attn_mask)


class DigestIndex:
    """Memo of image digests by (size, mtime_ns), used only under --skip_cache_check."""

    def __init__(self, path: Path | None, trust_stat: bool) -> None:
        self.path, self.trust_stat = path, trust_stat
        self._entries: dict[str, list] = {}
        self._dirty = False
        if path is not None and path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}  # a damaged index only costs re-hashing

    def digest(self, file: Path) -> str:
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self._entries.get(str(file))
        if self.trust_stat and hit and hit[:2] == stamp:
            return hit[2]
        d = file_digest(file)
        self._entries[str(file)] = stamp + [d]
        self._dirty = True
        return d

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            write_text_atomic(self.path, json.dumps(self._entries))
        except OSError:
            return  # only a speed-up for --skip_cache_check; the cache itself reports unwritable folders
        self._dirty = False


@dataclass
class TensorCache:
    """Entries {name: tensor} by key; in memory (root None) or one safetensors file per entry under root."""

    root: Path | None
    kind: str  # "latents" | "text"
    skip_check: bool = False
    _memory: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    written: int = 0  # entries this object has put (encoded by this process)

    def file(self, key: str) -> Path:
        assert self.root is not None
        return self.root / self.kind / key[:2] / f"{key}.safetensors"

    def has(self, key: str, required: Iterable[str] = ()) -> bool:
        if self.root is None:
            return key in self._memory
        f = self.file(key)
        if not f.exists():
            return False
        if self.skip_check:
            return True
        try:  # a whole file with every tensor the caller needs
            header = read_header(f)
        except UserError:
            return False
        return all(name in header for name in required)

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        self.written += 1
        if self.root is None:
            self._memory[key] = tensors
        else:
            try:
                save_file_atomic(tensors, self.file(key), metadata=meta)
            except OSError as e:  # read-only dataset folder, full disk
                raise UserError(f"{self.root}: cannot write the {self.kind} cache ({e.strerror or e}); make it "
                                "writable and free space, or cache in memory (without _to_disk)") from None

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if self.root is None:
            return self._memory[key]
        try:
            if self.skip_check:  # a truncated or foreign entry is one line, not a SafetensorError
                read_header(self.file(key))
            return load_file(str(self.file(key)))
        except UserError as e:
            raise UserError(f"{e}; unreadable cache entry: delete it to re-encode") from None
        except Exception as e:  # noqa: BLE001 (OSError, safetensors' own error for a damaged body)
            raise UserError(f"{self.file(key)}: unreadable cache entry ({e}); delete it to re-encode") from None

    def memory_entries(self) -> dict[str, dict[str, torch.Tensor]]:
        """The in-memory entries {key: tensors} (to share them with other ranks)."""
        return dict(self._memory)

    def add_entries(self, entries: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take entries encoded elsewhere (another rank's share) into the in-memory store."""
        assert self.root is None, "only an in-memory cache takes entries; on disk every rank reads the files"
        self._memory.update(entries)

    def remove_stale_temporaries(self) -> int:
        """Delete `.name.tmpPID` files a killed run left behind (only our own cache files)."""
        if self.root is None or not (self.root / self.kind).exists():
            return 0
        n = 0
        # ours (`.name.tmpPID`, of processes that no longer run: two runs may share a dataset's cache) and
        # safetensors' own `.tmpXXXXXX` that older versions left (nothing else writes into this folder)
        for p in (self.root / self.kind).rglob(".*"):
            ours = parse_temporary(p.name)
            if (ours and not pid_alive(ours[2])) or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", p.name):
                p.unlink(missing_ok=True)
                n += 1
        return n


@dataclass(frozen=True)
class Prepared:
    """One image ready for the AE: [-1, 1] float tensors, plus what is stored beside its latents."""

    image: torch.Tensor  # [3, H, W]
    loss_mask: torch.Tensor | None = None  # [1, H/8, W/8] in [0, 1]
    cond: torch.Tensor | None = None  # [3, H, W] conditioning (Kontext reference) image


@dataclass(frozen=True)
class LatentJob:
    """One latent entry to make: its key, and what the encoding loop needs to know without the dataset."""

    key: str
    path: Path  # the image, for messages and --skip_bad_images
    group: tuple  # jobs with equal groups (bucket size, flip, cond) are encoded in one AE batch
    flip_aug: bool
    required: tuple[str, ...]  # the tensors a whole entry has (`latent_required`)
    uid: int  # the dataset item it is for
    control: bool = False  # the entry of a degraded item's control image (not of the image itself)


def latent_required(flip_aug: bool, has_mask: bool, has_cond: bool) -> tuple[str, ...]:
    """The tensor names of a whole latent entry."""
    names = ["latents"] + (["latents_flipped"] if flip_aug else [])
    names += ["loss_mask"] if has_mask else []
    names += (["cond_latents"] + (["cond_latents_flipped"] if flip_aug else [])) if has_cond else []
    return tuple(names)
