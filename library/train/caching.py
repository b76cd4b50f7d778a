"""Running the encoders over the dataset before step 1, split across ranks: latents and text-encoder outputs.

The one place encoders run over the items: `encode_latents` / `encode_text` fill the content-keyed store
(library/data/cache.py) and return the dataset that reads from it (datasets are immutable, so caching makes a
new one with its `LatentEntries` / `TextEntries` and the images found unreadable).

With N processes rank r encodes only its share (images with uid % N == r; every N-th caption variant), so
each image and caption is encoded exactly once over all ranks. Then every rank must see the whole cache
before step 1: on disk a barrier suffices (the files are shared); in memory the ranks all-gather their
entries (in chunks, so no rank holds more than one chunk of the others' pickles at a time). A last pass over
the whole dataset then only finds and indexes entries; `CacheReport` says what each rank encoded and what
it holds, and the trainer logs it. While ranks write into a shared cache folder nobody deletes the stale
temporary files a killed run left there (that would delete another rank's file in flight): that cleaning
happens in the last pass, after the barrier, when nothing is written.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from library.data.cache import DigestIndex, LatentJob, Prepared, TensorCache, checkpoint_identity, text_key
from library.data.dataset import FluxDataset, LatentEntries, TextEntries
from library.data.images import BadImageError
from library.train.config import TrainConfig
from library.train.models import Models
from library.train.precision import Dtypes

log = logging.getLogger(__name__)

GATHER_CHUNK = 64  # entries per all-gather round (a T5 output at 512 tokens is 4 MiB in bf16)


# ---------------------------------------------------------------------------------------------- encoding loops

def batched(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# A text-encoder callable: captions -> (t5_out [B,S,4096], clip_pooled [B,768], t5_attn_mask [B,S]).
TextEncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def encode_captions(captions: Iterable[str], encode: TextEncodeFn, cache: TensorCache, te_id: str,
                    t5_max_length: int, apply_t5_attn_mask: bool, batch_size: int = 8,
                    progress: bool = True) -> dict[str, str]:
    """Encode every distinct caption that is not cached yet; returns {caption: key} for all of them."""
    keys = {c: text_key(c, te_id, t5_max_length, apply_t5_attn_mask) for c in dict.fromkeys(captions)}
    required = ("t5_out", "clip_pooled", "t5_attn_mask")
    missing = [c for c, k in keys.items() if not cache.has(k, required)]
    with tqdm(total=len(missing), desc="caching text-encoder outputs", unit="caption",
              disable=not progress or not missing) as bar:
        for chunk in batched(missing, batch_size):
            t5, pooled, mask = encode(chunk)
            for i, c in enumerate(chunk):
                cache.put(keys[c], {"t5_out": t5[i], "clip_pooled": pooled[i], "t5_attn_mask": mask[i]},
                          meta={"caption": c[:2000], "te_id": te_id})
            bar.update(len(chunk))
    return keys


def text_encode_fn(encoders: Any, t5_max_length: int, apply_t5_attn_mask: bool) -> TextEncodeFn:
    """Adapter for `library.flux.text_encoders.FluxTextEncoders.encode`."""

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = encoders.encode(prompts, t5_max_length, apply_t5_attn_mask)
        return out.t5_out, out.clip_pooled, out.t5_attn_mask

    return encode


def ae_encode_fn(ae: Any, device: torch.device | str, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Adapter for `AutoEncoder.encode`: float [-1, 1] images on CPU -> latents on CPU (deterministic mean)."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ae.encode(x.to(device, dtype), sample=False).to("cpu")

    return encode


def _encode_group(jobs: list[LatentJob], prepared: list[Prepared], encode: Callable[[torch.Tensor], torch.Tensor],
                  cache: TensorCache, ae_id: str) -> None:
    x = torch.stack([p.image for p in prepared])
    out = {"latents": encode(x)}
    if jobs[0].flip_aug:  # the AE is not flip-equivariant: encode the mirrored images too
        out["latents_flipped"] = encode(torch.flip(x, dims=[3]))
    if prepared[0].cond is not None:
        c = torch.stack([p.cond for p in prepared])
        out["cond_latents"] = encode(c)
        if jobs[0].flip_aug:
            out["cond_latents_flipped"] = encode(torch.flip(c, dims=[3]))
    for i, (job, prep) in enumerate(zip(jobs, prepared)):
        entry = {k: v[i] for k, v in out.items()}
        if prep.loss_mask is not None:
            entry["loss_mask"] = prep.loss_mask
        cache.put(job.key, entry, meta={"image": str(job.path), "ae_id": ae_id})


def _prefetch(pool: Any, fn: Callable, items: list, depth: int) -> Iterator:
    """pool.map with at most `depth` results in flight (Executor.map would decode every image up front)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def encode_latent_jobs(jobs: list[LatentJob], prepare: Callable[[LatentJob], Prepared],
                       encode: Callable[[torch.Tensor], torch.Tensor], cache: TensorCache, ae_id: str,
                       batch_size: int = 1, skip_bad_images: bool = False, progress: bool = True,
                       num_threads: int = 2, clean_temporaries: bool = True) -> list[Path]:
    """Encode every job whose entry is missing; returns the images skipped as unreadable.

    Jobs are grouped by `group` and sorted, so each AE call gets one image size; images decode in a
    small thread pool (Pillow releases the GIL) while the AE works on the previous batch.
    """
    if clean_temporaries:  # not while other ranks write into the same folder (see the module note)
        cache.remove_stale_temporaries()
    missing = sorted({j.key: j for j in jobs if not cache.has(j.key, j.required)}.values(),
                     key=lambda j: (j.group, str(j.path)))
    chunks: list[list[LatentJob]] = []
    for j in missing:
        if chunks and chunks[-1][0].group == j.group and len(chunks[-1]) < batch_size:
            chunks[-1].append(j)
        else:
            chunks.append([j])
    bad: list[Path] = []

    def load(chunk: list[LatentJob]) -> list[Prepared | BadImageError]:
        out: list[Prepared | BadImageError] = []
        for j in chunk:
            try:
                out.append(prepare(j))
            except BadImageError as e:
                out.append(e)
        return out

    with ThreadPoolExecutor(max_workers=num_threads) as pool, \
            tqdm(total=len(missing), desc="caching latents", unit="img", disable=not progress or not missing) as bar:
        for chunk, loaded in zip(chunks, _prefetch(pool, load, chunks, depth=2 * num_threads)):
            good = [(j, p) for j, p in zip(chunk, loaded) if isinstance(p, Prepared)]
            for j, p in zip(chunk, loaded):
                if isinstance(p, BadImageError):
                    if not skip_bad_images:
                        raise p
                    bad.append(j.path)
            if good:
                _encode_group([j for j, _ in good], [p for _, p in good], encode, cache, ae_id)
            bar.update(len(chunk))
    return bad

# ---------------------------------------------------------------------------------------------- one process

def encode_latents(dataset: FluxDataset, encode: Callable[[torch.Tensor], torch.Tensor], ae_id: str,
                   to_disk: bool, cache_dir: Path | None = None, skip_cache_check: bool = False,
                   batch_size: int = 1, progress: bool = True, num_threads: int | None = None,
                   memory: TensorCache | None = None, clean_temporaries: bool = True) -> tuple[FluxDataset, int]:
    """Encode (or reuse) the latents of every image; returns the dataset whose batches read them, and the
    number of entries encoded now (the rest were cached).

    On disk the entries go to `cache_dir`, or `<image_dir>/.flux_cache/` per subset; in memory they live in
    `memory` (a new store if None), held by the returned dataset (forked loader workers share them).
    """
    items = dataset.usable()
    roots = {dataset.cache_root(it, cache_dir) for it in items} if to_disk else {None}
    caches = {r: TensorCache(r, "latents", skip_cache_check) if r is not None or memory is None else memory
              for r in roots}
    written = sum(c.written for c in caches.values())
    digests = {r: DigestIndex(r / "digests.json" if r else None, skip_cache_check) for r in roots}
    jobs_by_root: dict[Path | None, list[LatentJob]] = {r: [] for r in roots}
    keys: dict[int, str] = {}
    control_keys: dict[int, str] = {}
    for it in tqdm(items, desc="hashing images", unit="img", disable=not progress or len(items) < 2):
        root = dataset.cache_root(it, cache_dir) if to_disk else None
        for job in dataset.latent_jobs(it, digests[root], ae_id):
            jobs_by_root[root].append(job)
            (control_keys if job.control else keys)[it.uid] = job.key
    bad = set(dataset.bad)
    for root, jobs in jobs_by_root.items():
        for p in encode_latent_jobs(jobs, dataset.latent_input, encode, caches[root], ae_id, batch_size,
                                    dataset.skip_bad_images, progress, num_threads or min(8, os.cpu_count() or 1),
                                    clean_temporaries):
            log.warning("skipping unreadable image %s", p)
            bad |= {it.uid for it in items if it.path == p}
        digests[root].save()
    stores = {it.uid: caches[dataset.cache_root(it, cache_dir) if to_disk else None] for it in items}
    entries = LatentEntries(stores, keys, control_keys)
    return dataset.replace(bad=frozenset(bad), latents=entries), sum(c.written for c in caches.values()) - written


def encode_text(dataset: FluxDataset, encode: TextEncodeFn, te_id: str, t5_max_length: int,
                apply_t5_attn_mask: bool, epochs: range, to_disk: bool, cache_dir: Path | None = None,
                skip_cache_check: bool = False, batch_size: int = 8, progress: bool = True,
                memory: TensorCache | None = None, shard: tuple[int, int] | None = None,
                clean_temporaries: bool = True) -> tuple[FluxDataset, int]:
    """Encode every caption the given epochs use (`FluxDataset.captions_to_cache`); returns the dataset whose
    batches read them, and the number of distinct captions covered.

    In memory the entries go to `memory` (a new store if None); `shard=(rank, world)` encodes only every
    world-th caption from rank (the caching split across ranks).
    """
    captions = dataset.captions_to_cache(epochs)
    if shard is not None:
        captions = captions[shard[0]::shard[1]]
    n_images = len(dataset.by_uid)
    if len(captions) > 4 * n_images:  # shuffling makes nearly every (sample, epoch) a new caption
        log.warning("caching %d caption variants for %d images over %d epochs (about %.1f GiB at FLUX-dev's "
                    "512x4096 bf16 T5 output); fewer epochs, or no --cache_text_encoder_outputs with "
                    "shuffle_caption, keeps this small", len(captions), n_images, len(epochs),
                    len(captions) * 512 * 4096 * 2 / 2**30)
    first = next(it for its in dataset.items for it in its)
    root = (cache_dir or dataset.cache_root(first, None)) if to_disk else None
    store = TensorCache(root, "text", skip_cache_check) if to_disk or memory is None else memory
    if clean_temporaries:
        store.remove_stale_temporaries()
    keys = encode_captions(captions, encode, store, te_id, t5_max_length, apply_t5_attn_mask, batch_size, progress)
    return dataset.replace(text=TextEntries(store, te_id, t5_max_length, apply_t5_attn_mask)), len(keys)


# ---------------------------------------------------------------------------------------------- across ranks

@dataclass(frozen=True)
class Ranks:
    """What caching needs of the process group: who we are, a barrier and an all-gather of objects."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]  # every rank's object, in rank order

    @staticmethod
    def of(acc: Any) -> "Ranks":
        if acc.num_processes == 1:
            return Ranks()
        return Ranks(acc.process_index, acc.num_processes, acc.wait_for_everyone, all_gather_object)


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class CacheReport:
    kind: str  # "latents" | "text"
    encoded: int  # entries this rank encoded
    entries: int  # entries this rank can read (the whole dataset's)


def share_memory_entries(store: TensorCache, ranks: Ranks, chunk: int = GATHER_CHUNK) -> int:
    """All-gather the in-memory entries of every rank into every rank's store; returns how many came in."""
    mine = sorted(store.memory_entries().items())
    rounds = max(ranks.gather(-(-len(mine) // chunk)))
    received = 0
    for i in range(rounds):
        for rank, part in enumerate(ranks.gather(dict(mine[i * chunk:(i + 1) * chunk]))):
            if rank != ranks.rank:
                store.add_entries(part)
                received += len(part)
    return received


def cache_latents(dataset: FluxDataset, encode: Callable[[torch.Tensor], torch.Tensor], ae_id: str,
                  to_disk: bool, ranks: Ranks, **kw: Any) -> tuple[FluxDataset, CacheReport]:
    memory = TensorCache(None, "latents")
    encoded = 0
    if ranks.world > 1:
        part, encoded = encode_latents(dataset.share(ranks.rank, ranks.world), encode, ae_id, to_disk,
                                       memory=memory, clean_temporaries=False, **kw)
        dataset = dataset.replace(bad=dataset.bad | part.bad)
        if not to_disk:
            share_memory_entries(memory, ranks)
        ranks.barrier()
    dataset, n = encode_latents(dataset, encode, ae_id, to_disk, memory=memory,
                                **{**kw, "progress": False} if ranks.world > 1 else kw)
    return dataset, CacheReport("latents", encoded + n, len(dataset.latents.keys))


def cache_text(dataset: FluxDataset, encode: Any, te_id: str, t5_max_length: int, apply_t5_attn_mask: bool,
               epochs: range, to_disk: bool, ranks: Ranks, **kw: Any) -> tuple[FluxDataset, CacheReport]:
    memory = TensorCache(None, "text")
    args = (encode, te_id, t5_max_length, apply_t5_attn_mask, epochs, to_disk)
    encoded = 0
    if ranks.world > 1:
        part, _ = encode_text(dataset, *args, memory=memory, shard=(ranks.rank, ranks.world),
                              clean_temporaries=False, **kw)
        encoded = part.text.store.written
        if not to_disk:
            share_memory_entries(memory, ranks)
        ranks.barrier()
        kw = {**kw, "progress": False}
    dataset, n = encode_text(dataset, *args, memory=memory, **kw)
    # On disk each pass has a store of its own; in memory both passes count into `memory`.
    full_pass = dataset.text.store.written - (0 if to_disk else encoded)
    return dataset, CacheReport("text", encoded + full_pass, n)


def cache_before_training(cfg: TrainConfig, ranks: Ranks, models: Models, dataset: FluxDataset, epochs: int,
                          dtypes: Dtypes, device: torch.device, progress: bool
                          ) -> tuple[FluxDataset, list[CacheReport]]:
    """The latent and text-encoder caches the flags ask for, split across ranks: the dataset that reads them,
    and what each rank did."""
    mem, reports = cfg.memory, []
    if mem.cache_latents:
        encode, ae_id = ae_encode_fn(models.ae, device, dtypes.ae), checkpoint_identity(cfg.model.ae)
        dataset, report = cache_latents(dataset, encode, ae_id, mem.cache_latents_to_disk, ranks,
                                        skip_cache_check=mem.skip_cache_check, batch_size=mem.vae_batch_size,
                                        progress=progress)
        reports.append(report)
    if mem.cache_text_encoder_outputs:
        te_id = checkpoint_identity(cfg.model.clip_l) + checkpoint_identity(cfg.model.t5xxl)
        encode = text_encode_fn(models.text, models.t5_max_length, cfg.model.apply_t5_attn_mask)
        dataset, report = cache_text(dataset, encode, te_id, models.t5_max_length, cfg.model.apply_t5_attn_mask,
                                     range(epochs), mem.cache_text_encoder_outputs_to_disk, ranks,
                                     skip_cache_check=mem.skip_cache_check,
                                     batch_size=mem.text_encoder_batch_size or 8, progress=progress)
        reports.append(report)
    for r in reports:
        log.info("rank %d/%d: %s cache: encoded %d here, %d entries readable", ranks.rank, ranks.world, r.kind,
                 r.encoded, r.entries)
    return dataset, reports
