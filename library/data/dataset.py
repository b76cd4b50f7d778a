"""The training dataset: deterministic per-epoch batches from one bucket each, from caches or images.

Order and augmentation are pure functions of (seed, epoch, position): epoch e's batch order comes from
`Random(f"order:{seed}:{e}")`, and each sample's caption / flip / crop draws from a generator seeded by
(seed, epoch, image uid, repeat index). A resumed run that restores (epoch, index) therefore sees exactly
the batches, captions and flips the interrupted run would have seen, and text-encoder caching can
enumerate the caption variants of every epoch in advance. Epochs are 0-based here; caption processing
gets epoch + 1, as kohya counts for caption_dropout_every_n_epochs.

A dataset is immutable once built: what caching learns (where each entry is, which images are unreadable) and
the run's step count come in through the constructor, and `replace` makes the dataset that has them
(library/train/caching.py runs the encoders and returns it). It only reads the caches, never fills them.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F

from library.data.buckets import crop_ltrb, make_batches
from library.data.cache import DigestIndex, LatentJob, Prepared, TensorCache, latent_key, latent_required, text_key
from library.data.captions import CaptionSpec, process_caption
from library.data.config import ResolvedDatasetConfig
from library.data.degrade import DegradationParams, apply_params, sample_params
from library.data.images import BadImageError, load_image, resize_crop
from library.data.scan import Item, balance_reg, scan, split_validation
from library.flux.geometry import AE_DOWNSAMPLE

log = logging.getLogger(__name__)

LATENT_DOWNSCALE = AE_DOWNSAMPLE  # the loss mask is pooled to the latent grid


@dataclass(frozen=True)
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
class Sample:
    """One sample of a batch: a cached or a freshly read image (one of latents / images is set)."""

    path: str
    caption: str
    is_reg: bool
    latents: torch.Tensor | None = None  # [16, H/8, W/8] from the latent cache
    cond_latents: torch.Tensor | None = None  # [16, H/8, W/8] Kontext reference or degraded control (cached)
    images: torch.Tensor | None = None  # [3, H, W] in [-1, 1]
    cond_images: torch.Tensor | None = None  # [3, H, W] in [-1, 1]
    loss_mask: torch.Tensor | None = None  # [1, H/8, W/8] in [0, 1]


@dataclass(frozen=True)
class BatchRef:
    dataset: int
    bucket: tuple[int, int]
    samples: tuple[tuple[int, int], ...]  # (image uid, repeat index)


@dataclass(frozen=True)
class LatentEntries:
    """Where each item's cached latents are (library/train/caching.py builds it after encoding)."""

    stores: Mapping[int, TensorCache]  # item uid -> the store holding its entries
    keys: Mapping[int, str]  # item uid -> its latents' entry (the variants of a degraded image share it)
    control_keys: Mapping[int, str]  # degraded item uid -> its control image's own entry


@dataclass(frozen=True)
class TextEntries:
    """The text-encoder cache and the settings its entries were keyed with (library.data.cache.text_key)."""

    store: TensorCache
    te_id: str
    t5_max_length: int
    apply_t5_attn_mask: bool


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
    """Items of every [[datasets]], their per-epoch batches, and the caches they read from; immutable."""

    def __init__(self, cfg: ResolvedDatasetConfig, items: list[list[Item]], seed: int, validation: bool = False, *,
                 max_train_steps: int | None = None, skip_bad_images: bool = False, bad: frozenset[int] = frozenset(),
                 latents: LatentEntries | None = None, text: TextEntries | None = None) -> None:
        self.cfg, self.seed, self.validation = cfg, seed, validation
        self.items = tuple(tuple(its) for its in items)
        self.max_train_steps = max_train_steps  # the run's steps, for fractional token_warmup_step
        self.skip_bad_images = skip_bad_images  # skip unreadable images with a warning instead of stopping
        self.bad = frozenset(bad)  # uids found unreadable (at caching, under --skip_bad_images): never batched
        self.latents, self.text = latents, text  # the caches batches read from (None: read images / encode live)
        # (plain dicts, read only: a mappingproxy would not pickle into spawned loader workers)
        self.by_uid = {it.uid: it for its in items for it in its}
        self.specs = {(i, j): self._spec(sub) for i, ds in enumerate(cfg.datasets) for j, sub in enumerate(ds.subsets)}
        self._orders: dict[int, list[BatchRef]] = {}  # memo of `batches` (one epoch), a pure function
        self._built = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_built", False):
            raise AttributeError(f"FluxDataset is immutable once built (tried to set {name!r}); make the changed "
                                 "dataset with .replace(...)")
        object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> "FluxDataset":
        """A new dataset with some constructor arguments changed (max_train_steps, bad, latents, text, ...)."""
        args = dict(cfg=self.cfg, items=self.items, seed=self.seed, validation=self.validation,
                    max_train_steps=self.max_train_steps, skip_bad_images=self.skip_bad_images, bad=self.bad,
                    latents=self.latents, text=self.text)
        return FluxDataset(**{**args, **changes})

    def share(self, rank: int, world: int) -> "FluxDataset":
        """This rank's share of the images (uid % world == rank), for caching split across ranks."""
        return self.replace(items=[[it for it in its if it.uid % world == rank] for its in self.items])

    def usable(self) -> list[Item]:
        """Every item that is not known to be unreadable, in dataset order."""
        return [it for its in self.items for it in its if it.uid not in self.bad]

    def _spec(self, sub) -> CaptionSpec:
        spec = CaptionSpec.from_subset(sub)
        if self.validation:  # a stable validation loss: no dropout, shuffling or warm-up
            spec = CaptionSpec(**{**spec.__dict__, "shuffle_caption": False, "caption_dropout_rate": 0.0,
                                  "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
                                  "token_warmup_step": 0.0})
        return spec

    # ------------------------------------------------------------------------------------------ order
    def batches(self, epoch: int) -> list[BatchRef]:
        if epoch in self._orders:
            return self._orders[epoch]
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
        self._orders.clear()
        self._orders[epoch] = refs
        return refs

    def __len__(self) -> int:
        return len(self.batches(0))

    def _rng(self, what: str, epoch: int, uid: int, rep: int) -> random.Random:
        return random.Random(f"{what}:{self.seed}:{0 if self.validation else epoch}:{uid}:{rep}")

    def caption(self, uid: int, rep: int, epoch: int, step: int) -> str:
        it = self.by_uid[uid]
        return process_caption(list(it.captions), self.specs[it.dataset, it.subset],
                               self._rng("caption", epoch, uid, rep), epoch + 1, step, self.max_train_steps)

    def captions_to_cache(self, epochs: range) -> list[str]:
        """What text-encoder caching must cover: every caption variant of `epochs`, and "" when captions
        can drop out (kohya refuses TE caching with dropout / shuffle / wildcards; caching each variant keeps
        them working)."""
        captions = self.caption_variants(epochs)
        if any(s.caption_dropout_rate > 0 or s.caption_dropout_every_n_epochs > 0 for s in self.specs.values()):
            captions.append("")
        return captions

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

    # ------------------------------------------------------------------------------------------ cache entries
    def cache_root(self, it: Item, cache_dir: Path | None) -> Path:
        """The on-disk cache folder of an item: `cache_dir`, or `<image_dir>/.flux_cache/` (kohya also writes
        beside the images)."""
        if cache_dir is not None:
            return cache_dir
        sub = self.cfg.datasets[it.dataset].subsets[it.subset]
        return (sub.image_dir or sub.metadata_file.parent) / ".flux_cache"

    def latent_jobs(self, it: Item, digests: DigestIndex, ae_id: str) -> list[LatentJob]:
        """The latent entries an item needs: its own, and a degraded item's control image (its own entry)."""
        return [self._latent_job(it, digests, ae_id)] + \
            ([self._latent_job(it, digests, ae_id, control=True)] if it.variant is not None else [])

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
        has_mask = not control and (sub.alpha_mask or (it.cond_path is not None and self.cfg.masked_loss))
        has_cond = not control and it.cond_path is not None and not self.cfg.masked_loss
        return LatentJob(key, it.path, (a.bucket, sub.flip_aug, cond_role or ""), sub.flip_aug,  # "": sortable
                         latent_required(sub.flip_aug, has_mask, has_cond), it.uid, control)

    def latent_input(self, job: LatentJob) -> Prepared:
        """The AE's input for one of `latent_jobs`: the image at its bucket (centre crop, no flip) with its loss
        mask and conditioning image, or a degraded item's control image."""
        it = self.by_uid[job.uid]
        rgb, mask, cond = self._pixels(it, None)
        if job.control:
            return Prepared(_to_tensor(cond))
        if it.variant is not None:  # the target of a degraded item: the control is its own entry
            return Prepared(_to_tensor(rgb), None if mask is None else _mask_tensor(mask))
        return Prepared(_to_tensor(rgb), None if mask is None else _mask_tensor(mask),
                        None if cond is None else _to_tensor(cond))

    # ------------------------------------------------------------------------------------------ batches
    def load_batch(self, epoch: int, index: int) -> Batch | None:
        """Batch `index` of `epoch`; None if every image in it turned out unreadable (--skip_bad_images)."""
        ref = self.batches(epoch)[index]
        step = epoch * len(self.batches(epoch)) + index
        rows = [r for r in (self._sample(uid, rep, epoch, step) for uid, rep in ref.samples if uid not in self.bad)
                if r is not None]
        if not rows:
            return None
        ds = self.cfg.datasets[ref.dataset]
        stacked = {name: torch.stack([getattr(r, name) for r in rows]) if getattr(rows[0], name) is not None
                   else None for name in ("latents", "images", "cond_latents", "cond_images")}
        loss_mask = None
        if any(r.loss_mask is not None for r in rows):
            shape = (1, ref.bucket[1] // LATENT_DOWNSCALE, ref.bucket[0] // LATENT_DOWNSCALE)
            loss_mask = torch.stack([r.loss_mask if r.loss_mask is not None else torch.ones(shape)
                                     for r in rows]).float()
        captions = [r.caption for r in rows]
        return Batch(epoch, index, ref.bucket, [r.path for r in rows], captions, torch.tensor([r.is_reg for r in rows]),
                     torch.full((len(rows),), ds.network_multiplier), loss_mask=loss_mask, **stacked,
                     **self._text_outputs(captions))

    def _sample(self, uid: int, rep: int, epoch: int, step: int) -> Sample | None:
        it = self.by_uid[uid]
        sub = self.cfg.datasets[it.dataset].subsets[it.subset]
        rng = self._rng("aug", epoch, uid, rep)
        flip = sub.flip_aug and not self.validation and rng.random() < 0.5
        path, caption = str(it.path), self.caption(uid, rep, epoch, step)
        if self.latents is not None:
            store, sfx = self.latents.stores[uid], "_flipped" if flip else ""
            entry = store.get(self.latents.keys[uid])
            cond = entry.get("cond_latents" + sfx)
            if uid in self.latents.control_keys:  # a degraded control image: its own entry
                cond = store.get(self.latents.control_keys[uid])["latents" + sfx]
            mask = entry.get("loss_mask")
            return Sample(path, caption, it.is_reg, latents=entry["latents" + sfx], cond_latents=cond,
                          loss_mask=None if mask is None else (mask.flip(-1) if flip else mask))
        try:
            rgb, mask, cond = self._pixels(it, None if self.validation else rng)
        except BadImageError as e:
            if not self.skip_bad_images:
                raise
            log.warning("%s", e.skipped())  # skipped wherever it is met (the order stays a function of the seed)
            return None
        if flip:
            rgb, mask, cond = (None if a is None else np.ascontiguousarray(a[:, ::-1]) for a in (rgb, mask, cond))
        return Sample(path, caption, it.is_reg, images=_to_tensor(rgb),
                      cond_images=None if cond is None else _to_tensor(cond),
                      loss_mask=None if mask is None else _mask_tensor(mask))

    def _text_outputs(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Cached T5/CLIP outputs for the batch's captions; none (encode live) if any is missing."""
        if self.text is None:
            return {}
        t, entries = self.text, []
        for c in captions:
            key = text_key(c, t.te_id, t.t5_max_length, t.apply_t5_attn_mask)
            if not t.store.has(key):
                log.warning("caption not in the text-encoder cache, left to the trainer to encode: %r", c[:80])
                return {}
            entries.append(t.store.get(key))
        return {name: torch.stack([e[name] for e in entries]) for name in ("t5_out", "clip_pooled", "t5_attn_mask")}


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
    train_ds = FluxDataset(cfg, train_items, seed, skip_bad_images=skip_bad_images)
    if not any(val_items):
        return train_ds, None
    return train_ds, FluxDataset(cfg, val_items, seed, validation=True, skip_bad_images=skip_bad_images)


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
