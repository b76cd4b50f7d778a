"""Running the encoders over the dataset before step 1, split across ranks: latents and text-encoder outputs.

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
from dataclasses import dataclass
from typing import Any, Callable

import torch

from library.data.cache import TensorCache, ae_encode_fn, checkpoint_identity, text_encode_fn
from library.data.dataset import FluxDataset
from library.train.config import TrainConfig
from library.train.models import Models
from library.train.precision import Dtypes

log = logging.getLogger(__name__)

GATHER_CHUNK = 64  # entries per all-gather round (a T5 output at 512 tokens is 4 MiB in bf16)


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
                  to_disk: bool, ranks: Ranks, **kw: Any) -> CacheReport:
    memory = TensorCache(None, "latents")
    encoded = 0
    if ranks.world > 1:
        encoded = dataset.share(ranks.rank, ranks.world).cache_latents(encode, ae_id, to_disk, memory=memory,
                                                                       clean_temporaries=False, **kw)
        if not to_disk:
            share_memory_entries(memory, ranks)
        ranks.barrier()
    encoded += dataset.cache_latents(encode, ae_id, to_disk, memory=memory, **{**kw, "progress": False}
                                     if ranks.world > 1 else kw)
    return CacheReport("latents", encoded, len(dataset.latent_keys))


def cache_text(dataset: FluxDataset, encode: Any, te_id: str, t5_max_length: int, apply_t5_attn_mask: bool,
               epochs: range, to_disk: bool, ranks: Ranks, **kw: Any) -> CacheReport:
    memory = TensorCache(None, "text")
    args = (encode, te_id, t5_max_length, apply_t5_attn_mask, epochs, to_disk)
    encoded = 0
    if ranks.world > 1:
        dataset.cache_text_outputs(*args, memory=memory, shard=(ranks.rank, ranks.world), clean_temporaries=False,
                                   **kw)
        encoded = dataset.text_cache.written
        if not to_disk:
            share_memory_entries(memory, ranks)
        ranks.barrier()
        kw = {**kw, "progress": False}
    n = dataset.cache_text_outputs(*args, memory=memory, **kw)
    # On disk each pass has a store of its own; in memory both passes count into `memory`.
    full_pass = dataset.text_cache.written - (0 if to_disk else encoded)
    return CacheReport("text", encoded + full_pass, n)


def cache_before_training(cfg: TrainConfig, ranks: Ranks, models: Models, dataset: FluxDataset, epochs: int,
                          dtypes: Dtypes, device: torch.device, progress: bool) -> list[CacheReport]:
    """The latent and text-encoder caches the flags ask for, split across ranks; what each rank did."""
    mem, reports = cfg.memory, []
    if mem.cache_latents:
        encode, ae_id = ae_encode_fn(models.ae, device, dtypes.ae), checkpoint_identity(cfg.model.ae)
        reports.append(cache_latents(dataset, encode, ae_id, mem.cache_latents_to_disk, ranks,
                                     skip_cache_check=mem.skip_cache_check, batch_size=mem.vae_batch_size,
                                     progress=progress))
    if mem.cache_text_encoder_outputs:
        te_id = checkpoint_identity(cfg.model.clip_l) + checkpoint_identity(cfg.model.t5xxl)
        encode = text_encode_fn(models.text, models.t5_max_length, cfg.model.apply_t5_attn_mask)
        reports.append(cache_text(dataset, encode, te_id, models.t5_max_length, cfg.model.apply_t5_attn_mask,
                                  range(epochs), mem.cache_text_encoder_outputs_to_disk, ranks,
                                  skip_cache_check=mem.skip_cache_check,
                                  batch_size=mem.text_encoder_batch_size or 8, progress=progress))
    for r in reports:
        log.info("rank %d/%d: %s cache: encoded %d here, %d entries readable", ranks.rank, ranks.world, r.kind,
                 r.encoded, r.entries)
    return reports
