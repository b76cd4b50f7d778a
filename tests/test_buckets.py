"""Buckets against hand-computed cases (kohya's BucketManager arithmetic), crops, and batch formation."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from library.data.buckets import (Assignment, Bucketer, BucketSpec, crop_ltrb, make_batches,
                                  make_bucket_resolutions)

DATA = Path(__file__).resolve().parents[1] / "dataset_configs" / "data"


def test_bucket_resolutions_by_hand():
    # area 512*512; for w = 256..1024 step 64: h = min(1024, floor(262144 / w / 64) * 64), plus transposes
    expected = {(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)}
    got = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert got == sorted(expected)


@pytest.mark.parametrize("size,bucket,resized", [
    ((451, 300), (640, 384), (640, 426)),  # chelsea.png: aspect 1.503 -> 640/384=1.667 beats 576/448=1.286
    ((384, 191), (704, 320), (704, 350)),  # page.png: aspect 2.01 -> 704/320=2.2
    ((780, 780), (512, 512), (512, 512)),  # the dog photos
    ((300, 451), (384, 640), (426, 640)),  # portrait mirror of chelsea
    # motorcycle: aspect 1.482: |1.667 - 1.482| = .185 < |1.286 - 1.482| = .196; scale 640/741 -> 431.8 -> 432
    ((741, 500), (640, 384), (640, 432)),
])
def test_assignment_predefined(size, bucket, resized):
    b = Bucketer(BucketSpec((512, 512), enable_bucket=True))
    a = b.assign(*size)
    assert a == Assignment(bucket, resized)
    assert a.resized[0] >= a.bucket[0] and a.resized[1] >= a.bucket[1]


def test_no_upscale_by_hand():
    b = Bucketer(BucketSpec((512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert b.predefined == []
    # small image: never enlarged, bucket = size floored to 64
    assert b.assign(300, 200) == Assignment((256, 192), (300, 200))
    # 2000x1000 > 512^2: sqrt(262144*2) = 724.1 -> 704 (ratio 704/320 = 2.2) vs 362 -> 320 (640/320 = 2.0): keep 2.0
    assert b.assign(2000, 1000) == Assignment((640, 320), (640, 320))
    # 1000x700: ratio 1.4286; rw = 605.9 -> 576, 576/1.4286=403.2 -> 384: ratio 1.5; rh = 424.0 -> 384,
    # 384*1.4286 = 548.6 -> 512: ratio 1.333 -> |1.5-1.4286| = .071 < |1.333-1.4286| = .095: width first
    assert b.assign(1000, 700) == Assignment((576, 384), (576, 403))


def test_no_upscale_rounds_to_nearest_before_flooring_to_the_step():
    # kohya's round_to_steps: int(x + 0.5), then floor to the step. 999x1000 (aspect 0.999) > 512^2:
    # rw = sqrt(262144 * 0.999) = 511.74 -> 512 (truncating would give 511 -> 448); 512 / 0.999 = 512.5 -> 513
    # -> 512: ratio 1.0; rh = 512.26 -> 512, 512 * 0.999 = 511.5 -> 511 -> 448: ratio 0.875; width first wins
    b = Bucketer(BucketSpec((512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert b.assign(999, 1000) == Assignment((512, 512), (512, 513))


def test_single_bucket_without_enable_bucket():
    b = Bucketer(BucketSpec((512, 512)))
    assert b.assign(600, 400) == Assignment((512, 512), (768, 512))  # cover, then crop 128 px each side
    assert b.assign(100, 50) == Assignment((512, 512), (1024, 512))  # small images are enlarged, not asserted
    assert crop_ltrb((768, 512), (512, 512), False) == (128, 0, 640, 512)


def test_random_crop_in_bounds_and_seeded():
    boxes = {crop_ltrb((700, 500), (512, 384), True, random.Random(s)) for s in range(50)}
    assert len(boxes) > 20
    for l, t, r, b in boxes:
        assert 0 <= l <= 188 and 0 <= t <= 116 and r - l == 512 and b - t == 384
    assert crop_ltrb((700, 500), (512, 384), True, random.Random(3)) == \
        crop_ltrb((700, 500), (512, 384), True, random.Random(3))
    assert crop_ltrb((700, 500), (512, 384), False) == (94, 58, 606, 442)


def test_make_batches_never_mix_and_cover_everything():
    buckets = {(512, 512): list(range(7)), (640, 384): list(range(100, 103)), (384, 640): [200]}
    batches = make_batches(buckets, 3, random.Random(0))
    assert sorted(x for b in batches for x in b) == sorted(x for v in buckets.values() for x in v)
    for b in batches:
        assert len({next(r for r, v in buckets.items() if x in v) for x in b}) == 1
    assert sorted(len(b) for b in batches) == [1, 1, 3, 3, 3]  # 7 -> 3+3+1, 3 -> 3, 1 -> 1
    assert batches == make_batches(buckets, 3, random.Random(0))
    assert batches != make_batches(buckets, 3, random.Random(1))


def test_real_images_bucket_and_batch(tmp_path):
    from library.data.dataset import build_datasets
    from library.data.config import load_dataset_config

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f"""
[general]
resolution = 512
enable_bucket = true
batch_size = 2
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{DATA / 'clip_skimage_captioned'}"
  caption_extension = ".txt"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{DATA / 'dreambooth_dog'}"
  class_tokens = "sks dog"
""")
    train, _ = build_datasets(load_dataset_config(cfg_path), seed=0, progress=False)
    buckets = Counter()
    for it in train.items[0]:
        buckets[it.assignment.bucket] += it.repeats
    assert buckets == {(512, 512): 5, (640, 384): 8, (576, 448): 2, (704, 320): 2}
    refs = train.batches(0)
    assert sum(len(r.samples) for r in refs) == 17
    for r in refs:
        assert {train.by_uid[u].assignment.bucket for u, _ in r.samples} == {r.bucket}
    batch = train.load_batch(0, 0)
    w, h = batch.bucket
    assert batch.images.shape[1:] == (3, h, w) and -1.0 <= batch.images.min() and batch.images.max() <= 1.0
