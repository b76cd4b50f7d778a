"""Dataset: the real image sets through the tiny model stack, deterministic resumable order, reg images,
validation split, Kontext pairs / masked loss, fine-tuning metadata, and the plan."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.cache import checkpoint_identity
from library.data.config import dataset_flags, load_dataset_config
from library.data.dataset import BatchLoader, build_datasets
from library.data.plan import build_plan, format_plan
from library.train.caching import ae_encode_fn, encode_latents, encode_text, text_encode_fn
from library.errors import UserError

DATA = Path(__file__).resolve().parents[1] / "dataset_configs" / "data"


def cfg_file(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "data.toml"
    p.write_text(textwrap.dedent(body))
    return p


def images(folder: Path, n: int, size=(64, 64), prefix="img", captions=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(prefix) + n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
        if captions:
            (folder / f"{prefix}{i}.txt").write_text(f"{prefix} {i}, a, b, c")
    return folder


def real_config(tmp_path: Path) -> Path:
    return cfg_file(tmp_path, f"""
        [general]
        resolution = 256
        enable_bucket = true
        min_bucket_reso = 128
        max_bucket_reso = 512
        batch_size = 2
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{DATA / 'clip_skimage_captioned'}"
          caption_extension = ".txt"
          shuffle_caption = true
          caption_dropout_rate = 0.2
          [[datasets.subsets]]
          image_dir = "{DATA / 'dreambooth_dog'}"
          class_tokens = "sks dog"
          flip_aug = true
          num_repeats = 2
        """)


def test_real_sets_through_tiny_model_stack(tmp_path, tiny_ckpts):
    from library.flux.loading import load_autoencoder
    from library.flux.text_encoders import FluxTextEncoders

    ae = load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32)
    te = FluxTextEncoders.load(tiny_ckpts.clip_l, tiny_ckpts.t5xxl, "cpu", torch.float32)
    cfg = load_dataset_config(real_config(tmp_path), dataset_flags({"cache_latents_to_disk": True}))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    cache_dir = tmp_path / "cache"
    ae_id = checkpoint_identity(tiny_ckpts.ae)
    train, _ = encode_latents(train, ae_encode_fn(ae, "cpu", torch.float32), ae_id, to_disk=True,
                              cache_dir=cache_dir, batch_size=4, progress=False)
    train, n_text = encode_text(train, text_encode_fn(te, 16, True), checkpoint_identity(tiny_ckpts.t5xxl), 16,
                                True, epochs=range(2), to_disk=True, cache_dir=cache_dir, progress=False)
    assert len(list((cache_dir / "latents").rglob("*.safetensors"))) == 11
    # 6 captions (no commas to shuffle) + "sks dog" + "" for dropout
    assert n_text == len(list((cache_dir / "text").rglob("*.safetensors"))) == 8
    seen = 0
    for epoch in range(2):
        for b in BatchLoader(train).iter_epoch(epoch):
            w, h = b.bucket
            assert b.latents.shape[1:] == (16, h // 8, w // 8) and b.images is None
            assert b.t5_out.shape[:2] == (len(b.captions), 16) and b.t5_attn_mask.shape == (len(b.captions), 16)
            seen += len(b.captions)
    assert seen == 2 * (6 + 5 * 2)
    # the cached latents are the AE's encoding of the prepared image
    b = train.load_batch(0, 0)
    live, _ = build_datasets(cfg, seed=0, progress=False)
    x = live.load_batch(0, 0).images
    with torch.no_grad():
        assert torch.allclose(ae.encode(x), b.latents, atol=1e-5)
    # a second run reuses everything
    calls = []
    again, _ = build_datasets(cfg, seed=0, progress=False)
    again, _ = encode_latents(again, lambda x: calls.append(x) or x, ae_id, to_disk=True, cache_dir=cache_dir,
                              progress=False)
    assert calls == []


def test_resume_restores_the_exact_data_order(tmp_path):
    cfg = load_dataset_config(real_config(tmp_path))
    train, _ = build_datasets(cfg, seed=3, progress=False)
    loader = BatchLoader(train)
    it = loader.iter_epoch(0)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "index": 3, "seed": 3}
    rest = list(it) + list(loader.iter_epoch(1))
    fresh, _ = build_datasets(cfg, seed=3, progress=False)
    resumed = BatchLoader(fresh)
    resumed.load_state_dict(state)
    again = list(resumed.iter_epoch()) + list(resumed.iter_epoch(1))
    assert [b.paths for b in again] == [b.paths for b in rest]
    assert [b.captions for b in again] == [b.captions for b in rest]
    assert all(torch.equal(a.images, b.images) for a, b in zip(again, rest))
    assert [b.paths for b in first] != [b.paths for b in BatchLoader(train).iter_epoch(1)][:3]  # epochs differ
    other, _ = build_datasets(cfg, seed=4, progress=False)
    assert [r.samples for r in other.batches(0)] != [r.samples for r in train.batches(0)]


def test_ranks_split_the_epoch_evenly(tmp_path):
    train, _ = build_datasets(load_dataset_config(real_config(tmp_path)), seed=0, progress=False)
    n = len(train.batches(0))
    shards = [BatchLoader(train, rank=r, world_size=3).indices(0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and sorted(sum(shards, []))[:n] == list(range(n))


def test_reg_images_balanced_and_flagged(tmp_path):
    train_dir, reg_dir = images(tmp_path / "train", 5), images(tmp_path / "reg", 3, prefix="reg", captions=False)
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        [[datasets]]
        batch_size = 4
          [[datasets.subsets]]
          image_dir = "{train_dir}"
          caption_extension = ".txt"
          num_repeats = 2
          [[datasets.subsets]]
          image_dir = "{reg_dir}"
          is_reg = true
          class_tokens = "dog"
        """))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    reg = sorted((it.path.name, it.repeats) for it in train.items[0] if it.is_reg)
    assert reg == [("reg0.png", 4), ("reg1.png", 3), ("reg2.png", 3)]  # 10 training samples: 1+1+1, then +1 each
    flags = [(p, bool(f)) for b in BatchLoader(train).iter_epoch(0) for p, f in zip(b.paths, b.is_reg)]
    assert len(flags) == 20 and all(("reg" in Path(p).name) == f for p, f in flags)
    plan = build_plan(train, max_train_epochs=3)
    assert plan.steps_per_epoch == 5 and plan.total_steps == 15
    text = format_plan(plan)
    assert "5 images x 2 repeats = 10 samples" in text and "(reg): 3 images x 3..4 repeats = 10 samples" in text


def test_validation_split_is_disjoint_and_seeded(tmp_path):
    d = images(tmp_path / "imgs", 10)
    body = f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        validation_split = 0.3
        {{seed}}
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
          num_repeats = 3
          flip_aug = true
        """
    cfg = load_dataset_config(cfg_file(tmp_path, body.format(seed="")))
    train, val = build_datasets(cfg, seed=1, progress=False)
    tr = {it.path for it in train.items[0]}
    va = {it.path for it in val.items[0]}
    assert len(va) == 3 and len(tr) == 7 and not tr & va
    assert all(it.repeats == 1 for it in val.items[0])
    assert [b.paths for b in BatchLoader(val).iter_epoch(0)] == [b.paths for b in BatchLoader(val).iter_epoch(5)]
    cfg2 = load_dataset_config(cfg_file(tmp_path, body.format(seed="validation_seed = 9")))
    t2a, v2a = build_datasets(cfg2, seed=1, progress=False)
    t2b, v2b = build_datasets(cfg2, seed=2, progress=False)
    assert {it.path for it in v2a.items[0]} == {it.path for it in v2b.items[0]}  # validation_seed decides
    assert build_plan(t2a, validation=v2a).validation_images == 3


def test_kontext_pairs_cached_and_live(tmp_path):
    tgt = images(tmp_path / "edited", 3, size=(96, 64))
    ctl = images(tmp_path / "source", 3, size=(48, 32), captions=False)
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        enable_bucket = true
        min_bucket_reso = 32
        max_bucket_reso = 128
        bucket_reso_steps = 32
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{tgt}"
          conditioning_data_dir = "{ctl}"
          caption_extension = ".txt"
          flip_aug = true
        """))
    live, _ = build_datasets(cfg, seed=0, progress=False)
    b = live.load_batch(0, 0)
    assert b.cond_images.shape == b.images.shape and b.loss_mask is None
    cached, _ = build_datasets(cfg, seed=0, progress=False)
    enc = lambda x: torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]  # noqa: E731
    cached, _ = encode_latents(cached, enc, "ae", to_disk=False, progress=False)
    for i in range(len(live.batches(0))):
        a, c = live.load_batch(0, i), cached.load_batch(0, i)
        assert torch.allclose(enc(a.cond_images), c.cond_latents, atol=1e-6)
        assert torch.allclose(enc(a.images), c.latents, atol=1e-6)
    (ctl / "img1.png").unlink()
    with pytest.raises(UserError, match="img1.png: datasets\\[0\\].subsets\\[0\\]: no conditioning image"):
        build_datasets(cfg, seed=0, progress=False)


def test_masked_loss_uses_conditioning_image_as_mask(tmp_path):
    tgt = images(tmp_path / "img", 1)
    masks = tmp_path / "mask"
    masks.mkdir()
    m = np.zeros((64, 64), np.uint8)
    m[:, :32] = 255
    Image.fromarray(m).save(masks / "img0.png")
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{tgt}"
          conditioning_data_dir = "{masks}"
        """), dataset_flags({"masked_loss": True}))
    b = build_datasets(cfg, seed=0, progress=False)[0].load_batch(0, 0)
    assert b.cond_images is None and b.loss_mask.shape == (1, 1, 8, 8)
    assert torch.equal(b.loss_mask[0, 0, :, :4], torch.ones(8, 4)) and b.loss_mask[0, 0, :, 4:].sum() == 0


def test_finetune_metadata_json_and_jsonl(tmp_path):
    d = images(tmp_path / "imgs", 2, captions=False)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"img0": {"caption": "a cat", "tags": "cute, fluffy"},
                                str(d / "img1.png"): {"caption": "a dog", "image_size": [64, 64]}}))
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text(json.dumps({"image_path": "img1.png", "caption": "jsonl dog"}) + "\n")
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          metadata_file = "{meta}"
          image_dir = "{d}"
        [[datasets]]
          [[datasets.subsets]]
          metadata_file = "{jsonl}"
          image_dir = "{d}"
        """))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    caps = sorted(c for e in [0] for b in BatchLoader(train).iter_epoch(e) for c in b.captions)
    assert caps == ["a cat, cute, fluffy", "a dog", "jsonl dog"]


def test_plan_steps_and_multiplier(tmp_path):
    d1, d2 = images(tmp_path / "a", 3, size=(128, 64)), images(tmp_path / "b", 4)
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        enable_bucket = true
        min_bucket_reso = 32
        max_bucket_reso = 128
        bucket_reso_steps = 32
        caption_extension = ".txt"
        [[datasets]]
        batch_size = 2
        network_multiplier = 0.5
          [[datasets.subsets]]
          image_dir = "{d1}"
          num_repeats = 3
        [[datasets]]
        batch_size = 3
          [[datasets.subsets]]
          image_dir = "{d2}"
        """))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    # dataset 0: 128x64 (aspect 2) ties between 64x64 (ratio 1) and 96x32 (ratio 3); the first, 64x64, wins:
    # 9 samples / batch 2 -> 5 batches; dataset 1: 4 samples / batch 3 -> 2; 7 batches / accumulation 2 -> 4 steps
    plan = build_plan(train, max_train_steps=20, gradient_accumulation_steps=2, num_processes=1)
    b0 = sum(-(-n // 2) for _, n in plan.datasets[0].buckets)
    assert plan.datasets[0].batches == b0 == 5 and plan.datasets[1].batches == 2
    assert plan.batches_per_epoch == 7 and plan.steps_per_epoch == 4 and plan.epochs == 5 and plan.total_steps == 20
    mults = {float(b.network_multiplier[0]) for b in BatchLoader(train).iter_epoch(0)}
    assert mults == {0.5, 1.0}
    text = format_plan(plan)
    assert "dataset 0: resolution 64x64, batch_size 2, 5 batches per epoch" in text and "bucket 64x64: 4" in text


def test_color_aug_and_random_crop_live(tmp_path):
    d = images(tmp_path / "imgs", 1, size=(96, 64))
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
          random_crop = true
          color_aug = true
          num_repeats = 6
        """))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    imgs = [b.images for b in BatchLoader(train).iter_epoch(0)]
    assert all(x.shape == (1, 3, 64, 64) for x in imgs)
    assert len({x.sum().item() for x in imgs}) > 3


def test_progress_bars_for_scanning_and_caching(tmp_path, capsys):
    d = images(tmp_path / "imgs", 3)
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
        """))
    train, _ = build_datasets(cfg, seed=0, progress=True)
    train, _ = encode_latents(train, lambda x: x[:, :1].repeat(1, 16, 1, 1)[..., ::8, ::8], "ae", to_disk=False)
    train, _ = encode_text(train, lambda p: (torch.zeros(len(p), 4, 8), torch.zeros(len(p), 4),
                                        torch.ones(len(p), 4)), "te", 4, False, range(1), to_disk=False)
    err = capsys.readouterr().err
    for bar in ("scanning images", "caching latents", "caching text-encoder outputs"):
        assert re.search(bar + r"[^\n]*3/3", err), bar


def test_empty_metadata_is_an_error(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          metadata_file = "{meta}"
        """))
    with pytest.raises(UserError, match="datasets\\[0\\].subsets\\[0\\]: no images"):
        build_datasets(cfg, seed=0, progress=False)


def _warmup_config(tmp_path: Path) -> Path:
    d = images(tmp_path / "w", 2)
    return cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
          token_warmup_min = 1
          token_warmup_step = 0.5
        """)


def test_dataset_is_immutable_once_built(tmp_path):
    """Before, the trainer set `max_train_steps` and caching attached `latent_cache` / `text_cache` on the built
    dataset; now each is a constructor argument and `replace` makes the changed dataset."""
    train, _ = build_datasets(load_dataset_config(_warmup_config(tmp_path)), seed=0, progress=False)
    for name, value in (("max_train_steps", 10), ("latent_cache", None), ("bad", frozenset({0}))):
        with pytest.raises(AttributeError, match="immutable once built"):
            setattr(train, name, value)
    assert train.max_train_steps is None and not hasattr(train, "latent_cache") and train.bad == frozenset()
    # fractional token_warmup_step is a share of the run's steps: at step 0 of 10 only token_warmup_min tags
    run = train.replace(max_train_steps=10)
    assert run.max_train_steps == 10 and train.max_train_steps is None
    assert run.caption(0, 0, 0, 0) == "img 0" and train.caption(0, 0, 0, 0) == "img 0, a, b, c"
    assert [r.samples for r in run.batches(0)] == [r.samples for r in train.batches(0)]


def test_caching_returns_the_dataset_that_reads_the_cache(tmp_path):
    train, _ = build_datasets(load_dataset_config(_warmup_config(tmp_path)), seed=0, progress=False)
    enc = lambda x: torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]  # noqa: E731
    cached, n = encode_latents(train, enc, "ae", to_disk=False, progress=False)
    assert n == 2 and train.latents is None and cached.latents is not None
    live, read = train.load_batch(0, 0), cached.load_batch(0, 0)
    assert read.images is None and torch.allclose(read.latents, enc(live.images))
    with pytest.raises(AttributeError):
        read.latents = None  # a Batch is frozen too


def test_an_image_unreadable_at_batch_time_does_not_change_the_order(tmp_path, caplog):
    """Before, the main process added such an image to the dataset's `bad` set (worker processes could not), so
    later epochs' batch order depended on which process had met it; now it is skipped wherever it is met."""
    import io

    d = images(tmp_path / "imgs", 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[:-2000])  # header intact: passes the scan, fails decoding
    cfg = load_dataset_config(cfg_file(tmp_path, f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{d}"
        """))
    train, _ = build_datasets(cfg, seed=0, skip_bad_images=True, progress=False)
    order = [[r.samples for r in train.batches(e)] for e in range(3)]
    loader = BatchLoader(train)
    served = [sum(len(b.paths) for b in loader.iter_epoch(e)) for e in range(3)]
    assert served == [3, 3, 3] and "cut.jpg" in caplog.text
    assert [[r.samples for r in train.batches(e)] for e in range(3)] == order and train.bad == frozenset()
