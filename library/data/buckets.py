"""Aspect-ratio buckets as kohya builds them, and batches that never mix buckets.

Three modes (kohya `BucketManager`, re-derived):
* enable_bucket=false: one bucket, `resolution`; each image is scaled to cover it and cropped (kohya
  asserts instead when an image is larger/smaller; we resize, as its bucketing path does).
* enable_bucket=true: predefined buckets of about resolution W*H pixels, sides from min to max_bucket_reso
  in `bucket_reso_steps`; an image goes to the bucket with the closest aspect ratio, is scaled to cover it
  (`int(x * scale + 0.5)`) and centre- (or randomly) cropped.
* bucket_no_upscale=true: an image larger than W*H is shrunk keeping its aspect ratio (rounded to the step
  that keeps the ratio best); its bucket is that size floored to the step: cropped, never padded or upscaled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BucketSpec:
    resolution: tuple[int, int]  # (W, H)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass(frozen=True)
class Assignment:
    bucket: tuple[int, int]  # (W, H) the training size
    resized: tuple[int, int]  # (W, H) the image is resized to this, then cropped to `bucket`


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, steps: int
                            ) -> list[tuple[int, int]]:
    """The square of about max_reso's area, plus (w, h) and (h, w) for w = min..max in `steps`."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // steps) * steps
    resos = {(side, side)}
    for w in range(min_size, max_size + 1, steps):
        h = min(max_size, int(area // w // steps) * steps)
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
    return sorted(resos)


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


class Bucketer:
    """Assigns an image size to a bucket; `predefined` is empty in bucket_no_upscale mode."""

    def __init__(self, spec: BucketSpec) -> None:
        self.spec = spec
        if not spec.enable_bucket:
            self.predefined = [spec.resolution]
        elif spec.bucket_no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(spec.resolution, spec.min_bucket_reso,
                                                      spec.max_bucket_reso, spec.bucket_reso_steps)
        self._ratios = [w / h for w, h in self.predefined]

    def assign(self, width: int, height: int) -> Assignment:
        if self.predefined:
            return self._assign_predefined(width, height)
        return self._assign_no_upscale(width, height)

    def _assign_predefined(self, width: int, height: int) -> Assignment:
        aspect = width / height
        errors = [abs(r - aspect) for r in self._ratios]
        bw, bh = self.predefined[errors.index(min(errors))]  # first closest, as numpy argmin
        scale = bh / height if aspect > bw / bh else bw / width  # cover the bucket
        resized = (max(bw, int(width * scale + 0.5)), max(bh, int(height * scale + 0.5)))
        return Assignment((bw, bh), resized)

    def _assign_no_upscale(self, width: int, height: int) -> Assignment:
        steps = self.spec.bucket_reso_steps
        max_area = self.spec.resolution[0] * self.spec.resolution[1]
        aspect = width / height
        if width * height > max_area:
            rw = math.sqrt(max_area * aspect)
            rh = max_area / rw
            # Round either side to the step; keep whichever keeps the aspect ratio closer.
            w_first = _round_to_steps(rw, steps)
            ar_w = w_first / max(1, _round_to_steps(w_first / aspect, steps))
            h_first = _round_to_steps(rh, steps)
            ar_h = _round_to_steps(h_first * aspect, steps) / max(1, h_first)
            if abs(ar_w - aspect) < abs(ar_h - aspect):
                resized = (w_first, int(w_first / aspect + 0.5))
            else:
                resized = (int(h_first * aspect + 0.5), h_first)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        return Assignment(bucket, resized)


def crop_ltrb(resized: tuple[int, int], bucket: tuple[int, int], random_crop: bool,
              rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the bucket-sized window in the resized image: centred or random."""
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        assert rng is not None, "random_crop needs an rng"
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    else:
        left, top = dx // 2, dy // 2
    return left, top, left + bucket[0], top + bucket[1]


def make_batches(buckets: dict[tuple[int, int], Sequence[T]], batch_size: int, rng: random.Random
                 ) -> list[list[T]]:
    """Shuffle within each bucket, cut into batches (the last one may be short), shuffle the batches.

    Every batch comes from a single bucket, so its tensors stack without padding.
    """
    batches: list[list[T]] = []
    for reso in sorted(buckets):
        items = list(buckets[reso])
        rng.shuffle(items)
        batches += [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    rng.shuffle(batches)
    return batches
