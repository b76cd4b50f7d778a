"""Scanning subsets into items: image paths, sizes (header only), captions, conditioning pairs, buckets.

Everything a plan needs comes from here without decoding pixels: sizes come from image headers (with EXIF
orientation), so `--dry_run` on thousands of images takes seconds. Unreadable headers are collected and
reported all at once (or skipped with a warning under --skip_bad_images).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from library.data.buckets import Assignment, Bucketer, BucketSpec
from library.data.captions import CaptionSpec, find_caption
from library.data.images import BadImageError, list_images, read_size
from library.data.pairs import AFTER, BEFORE, check_sizes, match_pairs
from library.data.schema import CONTROL, FINETUNE, IMAGE_EXTENSIONS
from library.data.config import DatasetConfig, ResolvedDatasetConfig, SubsetConfig
from library.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image of one subset; `repeats` is per epoch (reg images may get more, see `balance_reg`)."""

    uid: int
    path: Path
    size: tuple[int, int]  # (W, H) upright
    dataset: int
    subset: int
    captions: tuple[str, ...]
    caption_source: str  # file | class_tokens | metadata | none
    is_reg: bool
    repeats: int
    assignment: Assignment
    cond_path: Path | None = None
    variant: int | None = None  # degraded subsets: which degraded version of the image (its control image)
    image_key: str = ""  # what seeds the degradation parameters: the path relative to image_dir


def bucket_spec(ds: DatasetConfig) -> BucketSpec:
    return BucketSpec(ds.resolution, ds.enable_bucket, ds.min_bucket_reso, ds.max_bucket_reso,
                      ds.bucket_reso_steps, ds.bucket_no_upscale)


def _metadata_entries(sub: SubsetConfig, where: str) -> list[tuple[Path, str, tuple[int, int] | None]]:
    """Fine-tuning metadata: JSON {key: {caption, tags, image_size}} or JSONL {image_path, ...}."""
    path = sub.metadata_file
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
            data = {r.get("image_path", ""): r for r in rows}
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {where}.metadata_file: cannot read metadata JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {where}.metadata_file: expected a JSON object of image -> {{caption, tags}}")
    out = []
    for key, meta in data.items():
        meta = meta if isinstance(meta, dict) else {}
        caption = str(meta.get("caption") or "")
        if meta.get("tags"):
            caption = f"{caption}{sub.caption_separator} {meta['tags']}" if caption else str(meta["tags"])
        size = meta.get("image_size")
        out.append((_find_metadata_image(key, sub, path, where), caption,
                    tuple(size) if isinstance(size, list) and len(size) == 2 else None))
    return out


def _find_metadata_image(key: str, sub: SubsetConfig, meta_path: Path, where: str) -> Path:
    base = [Path(key)] + ([sub.image_dir / key] if sub.image_dir else [])
    for p in base:
        for cand in [p] + [p.with_name(p.name + ext) for ext in IMAGE_EXTENSIONS]:
            if cand.is_file():
                return cand
    raise UserError(f"{meta_path}: {where}: image {key!r} of the metadata not found"
                    + ("" if sub.image_dir else "; set image_dir for relative names"))


def _cond_image(image: Path, cond_dir: Path) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for cand in (cond_dir / (image.stem + ext), cond_dir / (image.stem + ext.upper())):
            if cand.is_file():
                return cand
    return None


def _subset_sources(sub: SubsetConfig, style: str, where: str, errors: list[str], side: str = AFTER
                    ) -> list[tuple[Path, list[str], str, tuple[int, int] | None, Path | None]]:
    """(image, caption lines, caption source, known size, conditioning image) for each image of a subset.
    With before_dir, side "before" takes each after image's before partner (captions stay the after's)."""
    if style == FINETUNE:
        return [(p, [c], "metadata", size, None) for p, c, size in _metadata_entries(sub, where)]
    spec = CaptionSpec.from_subset(sub)
    pairs = {}
    if sub.before_dir is not None:
        pairs = match_pairs(sub.image_dir, sub.before_dir, where, errors)
        check_sizes(pairs, errors)
    rows = []
    for img in list_images(sub.image_dir):
        try:
            lines, source = find_caption(img, spec)
        except UserError as e:  # a caption that cannot be decoded: collect it, report every one at once
            errors.append(str(e))
            continue
        cond = None
        if style == CONTROL:
            cond = _cond_image(img, sub.conditioning_data_dir)
            if cond is None:
                errors.append(f"{img}: {where}: no conditioning image named {img.stem}.* in "
                              f"{sub.conditioning_data_dir}")
        rows.append((pairs.get(img, img) if side == BEFORE else img, lines, source, None, cond))
    return rows


def _read_sizes(paths: list[Path], skip_bad: bool, progress: bool) -> dict[Path, tuple[int, int] | BadImageError]:
    out: dict[Path, tuple[int, int] | BadImageError] = {}
    for p in tqdm(paths, desc="scanning images", unit="img", disable=not progress or len(paths) < 2):
        try:
            out[p] = read_size(p)
        except BadImageError as e:
            out[p] = e
    return out


def scan(cfg: ResolvedDatasetConfig, skip_bad_images: bool = False, progress: bool = True) -> list[list[Item]]:
    """Items per dataset (train + reg, before the validation split and reg balancing); one UserError for all."""
    errors: list[str] = []
    rows_by_subset = {}
    for i, ds in enumerate(cfg.datasets):
        for j, sub in enumerate(ds.subsets):
            if sub.face_crop_aug_range is not None:
                errors.append(f"{cfg.path}: datasets[{i}].subsets[{j}].face_crop_aug_range: face-centred crops "
                              "are not supported by this trainer; remove the key")
            rows_by_subset[i, j] = _subset_sources(sub, ds.style, f"datasets[{i}].subsets[{j}]", errors,
                                                   cfg.pair_side)
            if not rows_by_subset[i, j]:
                errors.append(f"{cfg.path}: datasets[{i}].subsets[{j}]: no images "
                              f"({sub.metadata_file or sub.image_dir} lists none)")
    unknown = [r[0] for rows in rows_by_subset.values() for r in rows if r[3] is None]
    sizes = _read_sizes(unknown, skip_bad_images, progress)
    bad = [v for v in sizes.values() if isinstance(v, BadImageError)]
    if bad and not skip_bad_images:
        errors += [str(e) for e in bad]
    for e in bad if skip_bad_images else []:
        log.warning("%s", e.skipped())
    if errors:
        raise UserError("\n".join(errors))
    items: list[list[Item]] = [[] for _ in cfg.datasets]
    uid = 0
    for (i, j), rows in rows_by_subset.items():
        ds, sub = cfg.datasets[i], cfg.datasets[i].subsets[j]
        bucketer = Bucketer(bucket_spec(ds))
        for path, lines, source, size, cond in rows:
            size = size or sizes[path]
            if isinstance(size, BadImageError):
                continue
            a = bucketer.assign(*size)
            if a.bucket[0] < 16 or a.bucket[1] < 16:
                raise UserError(f"{path}: image {size[0]}x{size[1]} is smaller than bucket_reso_steps "
                                f"{ds.bucket_reso_steps} with bucket_no_upscale; remove it or lower the step")
            variants = [None] if sub.degradation is None else range(sub.degradation.variants)
            for v in variants:  # a degraded subset has images x variants items
                items[i].append(Item(uid, path, size, i, j, tuple(lines), source, sub.is_reg, sub.num_repeats, a,
                                     cond, v, image_key(path, sub)))
                uid += 1
    _warn_captionless(items)
    return items


def image_key(path: Path, sub: SubsetConfig) -> str:
    """A name of the image that survives moving the dataset folder (it seeds the degradation parameters)."""
    if sub.image_dir is not None and path.is_relative_to(sub.image_dir):
        return path.relative_to(sub.image_dir).as_posix()
    return path.name


def _warn_captionless(items: list[list[Item]]) -> None:
    paths = sorted({str(it.path) for its in items for it in its if it.caption_source == "none" and not it.is_reg})
    if paths:  # name them: a missing caption file is usually a typo in the file name or caption_extension
        more = f", ... ({len(paths) - 3} more)" if len(paths) > 3 else ""
        log.warning("%d image(s) have no caption file and no class_tokens: they train with an empty caption (%s%s)",
                    len(paths), ", ".join(paths[:3]), more)


def balance_reg(items: list[Item]) -> list[Item]:
    """kohya's rule: regularisation samples per epoch are brought up to the number of training samples.

    Reg images are taken in order with their repeats until the count reaches the training count (later
    ones may be left out, with a warning); if they fall short, each gets one more repeat in turn.
    """
    train = [it for it in items if not it.is_reg]
    reg = [it for it in items if it.is_reg]
    n_train = sum(it.repeats for it in train)
    if not reg or n_train == 0:
        return items
    repeats = [0] * len(reg)
    n, first = 0, True
    while n < n_train:
        for k, it in enumerate(reg):
            add = it.repeats if first else 1
            repeats[k] += add
            n += add
            if n >= n_train:
                break
        first = False
    unused = sum(1 for r in repeats if r == 0)
    if unused:
        log.warning("%d regularisation image(s) are not used: there are more than training samples", unused)
    balanced = [Item(**{**it.__dict__, "repeats": r}) for it, r in zip(reg, repeats) if r > 0]
    return train + balanced


def split_validation(items: list[Item], split: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Disjoint train/validation split of the training images (not reg), one seeded shuffle for both.

    Unlike kohya (which reshuffles with the global RNG when no validation_seed is set, so the two splits
    can overlap), the same permutation defines both sides.
    """
    if split <= 0:
        return items, []
    train = [it for it in items if not it.is_reg]
    paths = list(dict.fromkeys(it.path for it in train))  # the variants of an image stay on one side
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    n_val = int(math.floor(len(paths) * split))
    val_paths = {paths[k] for k in order[:n_val]}
    val_ids = {it.uid for it in train if it.path in val_paths}
    return ([it for it in items if it.uid not in val_ids],
            [Item(**{**it.__dict__, "repeats": 1}) for it in train if it.uid in val_ids])
