"""The training dataset: deterministic per-epoch batches from one bucket each, from caches or images.

Order and augmentation are pure functions of (seed, epoch, position): epoch e's batch order comes from
`Random(f"order:{seed}:{e}")`, and each sample's caption / flip / crop draws from a generator seeded by
(seed, epoch, image uid, repeat index). A resumed run that restores (epoch, index) therefore sees exactly
the batches, captions and flips the interrupted run would have seen, and text-encoder caching can
enumerate the caption variants of every epoch in advance. Epochs are 0-based here; caption processing
gets epoch + 1, as kohya counts for caption_dropout_every_n_epochs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F
from tqdm import tqdm

from library.data.buckets import crop_ltrb, make_batches
from library.data.cache import (DigestIndex, LatentJob, Prepared, TensorCache, cache_latents, cache_text_outputs,
                           latent_key, latent_required, text_key, TextEncodeFn)
from library.data.captions import CaptionSpec, process_caption
from library.data.config import ResolvedDatasetConfig
from library.data.degrade import DegradationParams, apply_params, sample_params
from library.data.images import BadImageError, load_image, resize_crop
from library.data.scan import Item, balance_reg, scan, split_validation
from library.flux.geometry import AE_DOWNSAMPLE

log = logging.getLogger(__name__)

LATENT_DOWNSCALE = AE_DOWNSAMPLE  # the loss mask is pooled to the latent grid


@dataclass
class Batch:
    """One training batch; every tensor is on CPU and every sample has the same bucket size."""

    epoch: int
    index: int
    bucket: tuple[int, int]  # (W, H) pixels
    paths: list[str]
    captions: list[str]
    is_reg: torch.Tensor  # [B] bool: weight the loss by prior_loss_weight
    network_multiplier: torch.Tensor  # [B] dataset-level network_multiplier
    latents: torch.Tensor | None = None  # [B, 16, H/8, W/8] from the latent cache
    images: torch.Tensor | None = None  # [B, 3, H, W] in [-1, 1] to be encoded (no latent cache)
    loss_mask: torch.Tensor | None = None  # [B, 1, H/8, W/8] in [0, 1] (alpha_mask / masked_loss)
    cond_latents: torch.Tensor | None = None  # [B, 16, H/8, W/8] Kontext reference (cached)
    cond_images: torch.Tensor | None = None  # [B, 3, H, W] Kontext reference to be encoded
    t5_out: torch.Tensor | None = None  # [B, S, 4096] from the text cache
    clip_pooled: torch.Tensor | None = None  # [B, 768]
    t5_attn_mask: torch.Tensor | None = None  # [B, S]


@dataclass(frozen=True)
class BatchRef:
    dataset: int
    bucket: tuple[int, int]
    samples: tuple[tuple[int, int], ...]  # (image uid, repeat index)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] at pixel resolution -> [1, H/8, W/8] in [0, 1] (area average, as the loss sees it)."""
    m = torch.from_numpy(np.array(mask)).float()[None, None] / 255.0
    return F.avg_pool2d(m, LATENT_DOWNSCALE)[0]


def _color_aug(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """Weak colour augmentation: a small random hue rotation (about kohya's +-8 of 180 degrees)."""
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
    shift = int(round(rng.uniform(-8 / 180, 8 / 180) * 256))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


class FluxDataset:
    """Items of every [[datasets]], their per-epoch batches, and the caches they read from."""

    def __init__(self, cfg: ResolvedDatasetConfig, items: list[list[Item]], seed: int,
                 validation: bool = False) -> None:
        self.cfg, self.seed, self.validation = cfg, seed, validation
        self.items = items
        self.by_uid = {it.uid: it for its in items for it in its}
        self.specs = {(i, j): self._spec(sub) for i, ds in enumerate(cfg.datasets) for j, sub in enumerate(ds.subsets)}
        self.max_train_steps: int | None = None  # for fractional token_warmup_step
        self.latent_cache: TensorCache | None = None
        self.text_cache: TensorCache | None = None
        self.latent_keys: dict[int, str] = {}
        self.control_keys: dict[int, str] = {}  # degraded items: the entry of the control image's latents
        self.text_keys: dict[str, str] = {}
        self.bad: set[int] = set()  # uids found unreadable under --skip_bad_images
        self.skip_bad_images = False
        self._order_cache: tuple[int, list[BatchRef]] | None = None

    def share(self, rank: int, world: int) -> "FluxDataset":
        """This rank's share of the images (uid % world == rank), for caching split across ranks."""
        items = [[it for it in its if it.uid % world == rank] for its in self.items]
        part = FluxDataset(self.cfg, items, self.seed, self.validation)
        part.max_train_steps, part.skip_bad_images, part.bad = self.max_train_steps, self.skip_bad_images, self.bad
        return part

    def _spec(self, sub) -> CaptionSpec:
        spec = CaptionSpec.from_subset(sub)
        if self.validation:  # a stable validation loss: no dropout, shuffling or warm-up
            spec = CaptionSpec(**{**spec.__dict__, "shuffle_caption": False, "caption_dropout_rate": 0.0,
                                  "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
                                  "token_warmup_step": 0.0})
        return spec

    # ------------------------------------------------------------------------------------------ order
    def batches(self, epoch: int) -> list[BatchRef]:
        if self._order_cache and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = random.Random(f"order:{self.seed}:{0 if self.validation else epoch}")
        refs: list[BatchRef] = []
        for i, its in enumerate(self.items):
            by_bucket: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for it in its:
                if it.uid not in self.bad:
                    by_bucket.setdefault(it.assignment.bucket, []).extend((it.uid, r) for r in range(it.repeats))
            for batch in make_batches(by_bucket, self.cfg.datasets[i].batch_size, rng):
                refs.append(BatchRef(i, self.by_uid[batch[0][0]].assignment.bucket, tuple(batch)))
        rng.shuffle(refs)  # datasets interleave, as kohya's shuffled DataLoader over its ConcatDataset
        self._order_cache = (epoch, refs)
        return refs

    def __len__(self) -> int:
        return len(self.batches(0))

    def _rng(self, what: str, epoch: int, uid: int, rep: int) -> random.Random:
        return random.Random(f"{what}:{self.seed}:{0 if self.validation else epoch}:{uid}:{rep}")

    def caption(self, uid: int, rep: int, epoch: int, step: int) -> str:
        it = self.by_uid[uid]
        return process_caption(list(it.captions), self.specs[it.dataset, it.subset],
                               self._rng("caption", epoch, uid, rep), epoch + 1, step, self.max_train_steps)

    def caption_variants(self, epochs: range) -> list[str]:
        """Every caption the given epochs will draw, in first-use order (what TE caching must cover)."""
        seen: dict[str, None] = {}
        for e in epochs:
            n = len(self.batches(e))
            for index, ref in enumerate(self.batches(e)):
                for uid, rep in ref.samples:
                    seen.setdefault(self.caption(uid, rep, e, e * n + index))
        return list(seen)

    # ------------------------------------------------------------------------------------------ pixels
    def _pixels(self, it: Item, rng: random.Random | None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(rgb, loss mask, conditioning rgb) cropped to the bucket; random crop/colour only with an rng."""
        ds, sub = self.cfg.datasets[it.dataset], self.cfg.datasets[it.dataset].subsets[it.subset]
        a, interp = it.assignment, sub.resize_interpolation or ds.resize_interpolation
        box = crop_ltrb(a.resized, a.bucket, sub.random_crop and rng is not None, rng)
        img = load_image(it.path)
        rgb = resize_crop(img.rgb, a.resized, box, interp)
        if sub.color_aug and rng is not None:
            rgb = _color_aug(rgb, rng)
        mask = cond = None
        if it.variant is not None:  # restoration pair: the control image is the degraded (cropped) target
            cond = apply_params(rgb, self.degradation_params(it))
        if sub.alpha_mask:
            alpha = img.alpha if img.alpha is not None else np.full(img.rgb.shape[:2], 255, np.uint8)
            mask = resize_crop(alpha, a.resized, box, interp)
        if it.cond_path is not None:
            c = load_image(it.cond_path).rgb
            c = resize_crop(c, a.resized, box, interp) if c.shape[:2] == img.rgb.shape[:2] else \
                self._cover(c, a.bucket, interp)
            if self.cfg.masked_loss:  # kohya: the conditioning image is the loss mask
                mask = np.round(c @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
            else:
                cond = c
        return rgb, mask, cond

    @staticmethod
    def _cover(rgb: np.ndarray, bucket: tuple[int, int], interp: str | None) -> np.ndarray:
        h, w = rgb.shape[:2]
        scale = max(bucket[0] / w, bucket[1] / h)
        resized = (max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5)))
        return resize_crop(rgb, resized, crop_ltrb(resized, bucket, False), interp)

    def degradation_params(self, it: Item) -> DegradationParams:
        """The drawn degradation of (image, variant): a function of the seed, the image key and the variant."""
        sub = self.cfg.datasets[it.dataset].subsets[it.subset]
        assert sub.degradation is not None and it.variant is not None
        return sample_params(sub.degradation, self.seed, it.image_key, it.variant)

    def pair(self, it: Item) -> tuple[np.ndarray, np.ndarray | None]:
        """(target, control) uint8 RGB at the item's bucket, centre crop, no flip: what a preview shows."""
        rgb, _, cond = self._pixels(it, None)
        return rgb, cond

    # ------------------------------------------------------------------------------------------ caching
    def _cache_root(self, it: Item, cache_dir: Path | None) -> Path:
        if cache_dir is not None:
            return cache_dir
        sub = self.cfg.datasets[it.dataset].subsets[it.subset]
        return (sub.image_dir or sub.metadata_file.parent) / ".flux_cache"

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], ae_id: str, to_disk: bool,
                      cache_dir: Path | None = None, skip_cache_check: bool = False, batch_size: int = 1,
                      progress: bool = True, num_threads: int | None = None,
                      memory: TensorCache | None = None, clean_temporaries: bool = True) -> int:
        """Encode (or reuse) the latents of every image; later batches read `latents` from the cache.

        On disk the entries go to `cache_dir`, or `<image_dir>/.flux_cache/` per subset (kohya also writes
        beside the images); in memory they live in `memory` (a new store if None) held by this object
        (forked loader workers share them). Returns the number of entries encoded now (the rest were cached).
        """
        items = [it for its in self.items for it in its if it.uid not in self.bad]
        roots = {self._cache_root(it, cache_dir) for it in items} if to_disk else {None}
        caches = {r: TensorCache(r, "latents", skip_cache_check) if r is not None or memory is None else memory
                  for r in roots}
        written = sum(c.written for c in caches.values())
        digests = {r: DigestIndex(r / "digests.json" if r else None, skip_cache_check) for r in roots}
        jobs_by_root: dict[Path | None, list[LatentJob]] = {r: [] for r in roots}
        self._job_items: dict[str, Item] = {}
        for it in tqdm_items(items, "hashing images", progress):
            root = self._cache_root(it, cache_dir) if to_disk else None
            job = self._latent_job(it, digests[root], ae_id)
            jobs_by_root[root].append(job)
            self._job_items[job.key] = it
            self.latent_keys[it.uid] = job.key
            if it.variant is not None:  # the variants share the target's entry; each control has its own
                control = self._latent_job(it, digests[root], ae_id, control=True)
                jobs_by_root[root].append(control)
                self._job_items[control.key] = it
                self.control_keys[it.uid] = control.key
        for root, jobs in jobs_by_root.items():
            bad = cache_latents(jobs, self._prepare, encode, caches[root], ae_id, self._required, batch_size,
                                self.skip_bad_images, progress, num_threads or min(8, os.cpu_count() or 1),
                                clean_temporaries)
            for p in bad:
                log.warning("skipping unreadable image %s", p)
                self.bad |= {it.uid for it in items if it.path == p}
            digests[root].save()
        self._latent_caches = {it.uid: caches[self._cache_root(it, cache_dir) if to_disk else None] for it in items}
        self.latent_cache = next(iter(caches.values()))
        self._order_cache = None
        return sum(c.written for c in caches.values()) - written

    def _latent_job(self, it: Item, digests: DigestIndex, ae_id: str, control: bool = False) -> LatentJob:
        ds, sub = self.cfg.datasets[it.dataset], self.cfg.datasets[it.dataset].subsets[it.subset]
        a = it.assignment
        cond_role = None if it.cond_path is None else ("mask" if self.cfg.masked_loss else "reference")
        cond_digest = digests.digest(it.cond_path) if it.cond_path else None
        if control:  # a degraded control image: a function of the image and its drawn parameters
            cond_role, cond_digest = "degraded", json.dumps(self.degradation_params(it).describe(), sort_keys=True)
        key = latent_key(digests.digest(it.path), a.bucket, a.resized, crop_ltrb(a.resized, a.bucket, False),
                         sub.flip_aug, sub.alpha_mask, sub.resize_interpolation or ds.resize_interpolation, ae_id,
                         cond_digest, cond_role)
        return LatentJob(key, it.path, (a.bucket, sub.flip_aug, cond_role or ""), sub.flip_aug)  # "": sortable

    def _required(self, job: LatentJob) -> tuple[str, ...]:
        it = self._job_items[job.key]
        if self.control_keys.get(it.uid) == job.key:
            return latent_required(job, False, False)
        has_mask = self.cfg.datasets[it.dataset].subsets[it.subset].alpha_mask or \
            (it.cond_path is not None and self.cfg.masked_loss)
        return latent_required(job, has_mask, it.cond_path is not None and not self.cfg.masked_loss)

    def _prepare(self, job: LatentJob) -> Prepared:
        it = self._job_items[job.key]
        rgb, mask, cond = self._pixels(it, None)
        if it.variant is not None:  # a degraded item has two entries: the control image's, the target's
            return Prepared(_to_tensor(cond)) if self.control_keys[it.uid] == job.key else \
                Prepared(_to_tensor(rgb), None if mask is None else _mask_tensor(mask))
        return Prepared(_to_tensor(rgb), None if mask is None else _mask_tensor(mask),
                        None if cond is None else _to_tensor(cond))

    def cache_text_outputs(self, encode: TextEncodeFn, te_id: str, t5_max_length: int, apply_t5_attn_mask: bool,
                           epochs: range, to_disk: bool, cache_dir: Path | None = None,
                           skip_cache_check: bool = False, batch_size: int = 8, progress: bool = True,
                           memory: TensorCache | None = None, shard: tuple[int, int] | None = None,
                           clean_temporaries: bool = True) -> int:
        """Encode every caption variant the given epochs use (and "" when captions can drop out).

        kohya refuses TE caching with caption dropout / shuffle / wildcards; caching each variant keeps
        them working. In memory the entries go to `memory` (a new store if None); `shard=(rank, world)`
        encodes only every world-th caption from rank (the caching split across ranks). Returns the number of
        distinct captions covered.
        """
        captions = self.caption_variants(epochs)
        if any(s.caption_dropout_rate > 0 or s.caption_dropout_every_n_epochs > 0 for s in self.specs.values()):
            captions.append("")
        if shard is not None:
            captions = captions[shard[0]::shard[1]]
        n_images = len(self.by_uid)
        if len(captions) > 4 * n_images:  # shuffling makes nearly every (sample, epoch) a new caption
            log.warning("caching %d caption variants for %d images over %d epochs (about %.1f GiB at FLUX-dev's "
                        "512x4096 bf16 T5 output); fewer epochs, or no --cache_text_encoder_outputs with "
                        "shuffle_caption, keeps this small", len(captions), n_images, len(epochs),
                        len(captions) * 512 * 4096 * 2 / 2**30)
        first = next(it for its in self.items for it in its)
        root = (cache_dir or self._cache_root(first, None)) if to_disk else None
        self.text_cache = TensorCache(root, "text", skip_cache_check) if to_disk or memory is None else memory
        if clean_temporaries:
            self.text_cache.remove_stale_temporaries()
        keys = cache_text_outputs(captions, encode, self.text_cache, te_id, t5_max_length, apply_t5_attn_mask,
                                  batch_size, progress)
        self.text_keys.update(keys)
        self._text_params = (te_id, t5_max_length, apply_t5_attn_mask)
        return len(keys)

    # ------------------------------------------------------------------------------------------ batches
    def load_batch(self, epoch: int, index: int) -> Batch | None:
        """Batch `index` of `epoch`; None if every image in it turned out unreadable (--skip_bad_images)."""
        ref = self.batches(epoch)[index]
        step = epoch * len(self.batches(epoch)) + index
        samples = [s for s in ref.samples if s[0] not in self.bad]
        rows = [r for r in (self._sample(uid, rep, epoch, step) for uid, rep in samples) if r is not None]
        if not rows:
            return None
        ds = self.cfg.datasets[ref.dataset]
        batch = Batch(epoch, index, ref.bucket, [r["path"] for r in rows], [r["caption"] for r in rows],
                      torch.tensor([r["is_reg"] for r in rows]),
                      torch.full((len(rows),), ds.network_multiplier))
        for name in ("latents", "images", "cond_latents", "cond_images"):
            if rows[0].get(name) is not None:
                setattr(batch, name, torch.stack([r[name] for r in rows]))
        if any(r.get("loss_mask") is not None for r in rows):
            shape = (1, ref.bucket[1] // LATENT_DOWNSCALE, ref.bucket[0] // LATENT_DOWNSCALE)
            batch.loss_mask = torch.stack([r["loss_mask"] if r.get("loss_mask") is not None
                                           else torch.ones(shape) for r in rows]).float()
        self._attach_text(batch)
        return batch

    def _sample(self, uid: int, rep: int, epoch: int, step: int) -> dict | None:
        it = self.by_uid[uid]
        sub = self.cfg.datasets[it.dataset].subsets[it.subset]
        rng = self._rng("aug", epoch, uid, rep)
        flip = sub.flip_aug and not self.validation and rng.random() < 0.5
        row: dict = {"path": str(it.path), "caption": self.caption(uid, rep, epoch, step), "is_reg": it.is_reg}
        if self.latent_cache is not None:
            entry = self._latent_caches[uid].get(self.latent_keys[uid])
            sfx = "_flipped" if flip else ""
            row["latents"] = entry["latents" + sfx]
            row["cond_latents"] = entry.get("cond_latents" + sfx)
            if uid in self.control_keys:  # a degraded control image: its own entry
                row["cond_latents"] = self._latent_caches[uid].get(self.control_keys[uid])["latents" + sfx]
            mask = entry.get("loss_mask")
            row["loss_mask"] = None if mask is None else (mask.flip(-1) if flip else mask)
            return row
        try:
            rgb, mask, cond = self._pixels(it, None if self.validation else rng)
        except BadImageError as e:
            if not self.skip_bad_images:
                raise
            log.warning("%s", e.skipped())
            self.bad.add(uid)
            return None
        if flip:
            rgb, mask, cond = (None if a is None else np.ascontiguousarray(a[:, ::-1]) for a in (rgb, mask, cond))
        row["images"] = _to_tensor(rgb)
        row["loss_mask"] = None if mask is None else _mask_tensor(mask)
        row["cond_images"] = None if cond is None else _to_tensor(cond)
        return row

    def _attach_text(self, batch: Batch) -> None:
        """Cached T5/CLIP outputs for the batch's captions; left None (encode live) if any is missing."""
        if self.text_cache is None:
            return
        entries = []
        for c in batch.captions:
            key = text_key(c, *self._text_params)
            if not self.text_cache.has(key):
                log.warning("caption not in the text-encoder cache, left to the trainer to encode: %r", c[:80])
                return
            entries.append(self.text_cache.get(key))
        batch.t5_out = torch.stack([e["t5_out"] for e in entries])
        batch.clip_pooled = torch.stack([e["clip_pooled"] for e in entries])
        batch.t5_attn_mask = torch.stack([e["t5_attn_mask"] for e in entries])


def tqdm_items(items: list, desc: str, progress: bool):
    return tqdm(items, desc=desc, unit="img", disable=not progress or len(items) < 2)


def build_datasets(cfg: ResolvedDatasetConfig, seed: int, skip_bad_images: bool = False, progress: bool = True
                   ) -> tuple[FluxDataset, FluxDataset | None]:
    """Scan every subset and build the training dataset and (if any validation_split) the validation one."""
    scanned = scan(cfg, skip_bad_images, progress)
    train_items: list[list[Item]] = []
    val_items: list[list[Item]] = []
    for ds, items in zip(cfg.datasets, scanned):
        val_seed = ds.validation_seed if ds.validation_seed is not None else seed
        train, val = split_validation(items, ds.validation_split, val_seed)
        train_items.append(balance_reg(train))
        val_items.append(val)
    train_ds = FluxDataset(cfg, train_items, seed)
    train_ds.skip_bad_images = skip_bad_images
    if not any(val_items):
        return train_ds, None
    val_ds = FluxDataset(cfg, val_items, seed, validation=True)
    val_ds.skip_bad_images = skip_bad_images
    return train_ds, val_ds


class BatchLoader:
    """Iterates a dataset's batches epoch by epoch from a restorable (epoch, index) position.

    With `num_workers` > 0 a torch DataLoader prepares batches in worker processes. With several
    processes (`world_size`), rank r takes batches r, r + world, ...; the epoch is padded by repeating
    its first batches so every rank steps the same number of times.
    """

    def __init__(self, dataset: FluxDataset, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 prefetch_factor: int = 2, persistent_workers: bool = False) -> None:
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor
        self.rank, self.world_size = rank, world_size
        self.persistent_workers = persistent_workers and num_workers > 0
        self.epoch, self.index = 0, 0  # the next batch to yield (index counts this rank's batches)
        self._todo = _Todo()  # what the next pass of the (persistent) DataLoader loads
        self._loader: torch.utils.data.DataLoader | None = None

    def indices(self, epoch: int) -> list[int]:
        n = len(self.dataset.batches(epoch))
        padded = list(range(n)) + list(range((-n) % self.world_size))
        return padded[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.indices(0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.dataset.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.dataset.seed) != self.dataset.seed:
            log.warning("resuming with seed %s, the saved data order used %s", self.dataset.seed, state["seed"])
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def iter_epoch(self, epoch: int | None = None) -> "Iterator[Batch]":
        """Yield the remaining batches of `epoch` (default: the saved position's epoch)."""
        if epoch is not None and epoch != self.epoch:
            self.epoch, self.index = epoch, 0
        todo = self.indices(self.epoch)[self.index:]
        for batch in self._produce(self.epoch, todo):
            self.index += 1
            if batch is not None:
                yield batch
        self.epoch, self.index = self.epoch + 1, 0

    def _produce(self, epoch: int, todo: list[int]):
        if self.num_workers <= 0:
            return (self.dataset.load_batch(epoch, i) for i in todo)
        # One DataLoader over (epoch, batch index) keys; the sampler is refilled each epoch, so with
        # --persistent_data_loader_workers the same worker processes serve every epoch (no ~5 s restart).
        self._todo.keys = [(epoch, i) for i in todo]
        if self._loader is None or not self.persistent_workers:
            self._loader = torch.utils.data.DataLoader(
                _BatchByKey(self.dataset), batch_size=None, sampler=self._todo, num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor, collate_fn=_identity,
                persistent_workers=self.persistent_workers)
        return iter(self._loader)


def _identity(x):
    return x


@dataclass
class _BatchByKey(torch.utils.data.Dataset):
    dataset: FluxDataset

    def __getitem__(self, key: tuple[int, int]) -> Batch | None:
        epoch, index = key
        return self.dataset.load_batch(epoch, index)


@dataclass
class _Todo(torch.utils.data.Sampler):
    keys: list[tuple[int, int]] = field(default_factory=list)

    def __iter__(self) -> "Iterator[tuple[int, int]]":
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)
