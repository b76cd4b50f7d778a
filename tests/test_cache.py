"""Latent / text-encoder cache: reuse, invalidation by content, resume after a kill, dropout under caching."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.data.cache import TensorCache, checkpoint_identity
from library.data.config import dataset_flags, load_dataset_config
from library.data.dataset import BatchLoader, build_datasets
from library.train.caching import encode_latents, encode_text

ROOT = Path(__file__).resolve().parents[1]


class FakeAE:
    """Deterministic stand-in for AutoEncoder.encode: 8x8 average pool, 16 channels."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        z = F.avg_pool2d(x, 8)
        return torch.cat([z * (k + 1) for k in range(16 // 3 + 1)], dim=1)[:, :16]


class FakeTE:
    """Stand-in for FluxTextEncoders.encode: outputs derived from a CRC of each caption."""

    def __init__(self, seq: int = 6) -> None:
        self.seq, self.encoded = seq, []

    def __call__(self, prompts: list[str]):
        self.encoded += prompts
        codes = torch.tensor([zlib.crc32(p.encode()) % 1000 for p in prompts], dtype=torch.float32)
        t5 = codes[:, None, None].expand(-1, self.seq, 8).clone()
        return t5, codes[:, None].expand(-1, 4).clone(), torch.ones(len(prompts), self.seq, dtype=torch.long)


def make_images(folder: Path, n: int, size=(96, 64), alpha: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 4 if alpha else 3), dtype=np.uint8)
        Image.fromarray(arr, "RGBA" if alpha else "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"tag{i}, red, blue, green")
    return folder


def config(tmp_path: Path, body: str, name: str = "c.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def dataset(path: Path, seed: int = 0, **cli):
    train, _ = build_datasets(load_dataset_config(path, dataset_flags(cli)), seed=seed, progress=False)
    return train


def basic(tmp_path: Path, n: int = 4, extra: str = "", res: int = 64) -> Path:
    d = make_images(tmp_path / "imgs", n)
    return config(tmp_path, f"""
        [general]
        resolution = {res}
        caption_extension = ".txt"
        batch_size = 2
        {extra}
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{d}"
        """)


def cache(ds, ae, ae_id="ae-1", **kw):
    kw.setdefault("to_disk", True)
    return encode_latents(ds, ae, ae_id, progress=False, **kw)[0]


def test_disk_reuse_and_content_invalidation(tmp_path):
    cfg = basic(tmp_path)
    ae = FakeAE()
    cache(dataset(cfg), ae)
    assert ae.images == 4
    files = sorted((tmp_path / "imgs" / ".flux_cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 4
    ae2 = FakeAE()
    cache(dataset(cfg), ae2)
    assert ae2.images == 0  # unchanged: reused
    Image.new("RGB", (96, 64), (9, 9, 9)).save(tmp_path / "imgs" / "img1.png")  # edit one image
    ae3 = FakeAE()
    cache(dataset(cfg), ae3)
    assert ae3.images == 1
    ae4 = FakeAE()
    cache(dataset(cfg), ae4, ae_id="ae-2")  # another AE: everything again
    assert ae4.images == 4
    ae5 = FakeAE()
    cache(dataset(basic(tmp_path, res=128)), ae5)  # another resolution (new bucket/resize): everything again
    assert ae5.images == 4


def test_cached_batches_equal_encoding_the_images(tmp_path):
    cfg = basic(tmp_path)
    live = dataset(cfg)
    cached = dataset(cfg)
    ae = FakeAE()
    cached = cache(cached, ae)
    for i in range(len(live.batches(0))):
        a, b = live.load_batch(0, i), cached.load_batch(0, i)
        assert a.paths == b.paths and a.captions == b.captions and b.images is None
        assert torch.allclose(ae(a.images), b.latents)


def test_skip_cache_check_trusts_size_and_mtime(tmp_path):
    cfg = basic(tmp_path)
    cache(dataset(cfg), FakeAE(), skip_cache_check=True)  # builds the digest index
    img = tmp_path / "imgs" / "img0.png"
    st = img.stat()
    data = bytearray(img.read_bytes())
    other = np.asarray(Image.open(img)).copy()
    other[0, 0] ^= 255
    buf = tmp_path / "x.png"
    Image.fromarray(other).save(buf)
    new = buf.read_bytes()
    if len(new) != len(data):  # keep the size so only the content differs
        pytest.skip("re-encoded PNG changed size")
    img.write_bytes(new)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    trusting = FakeAE()
    cache(dataset(cfg), trusting, skip_cache_check=True)
    assert trusting.images == 0  # same size and mtime: trusted, as documented
    checking = FakeAE()
    cache(dataset(cfg), checking)
    assert checking.images == 1  # content check catches it


def test_truncated_cache_entry_is_reencoded(tmp_path):
    cfg = basic(tmp_path)
    cache(dataset(cfg), FakeAE())
    f = next((tmp_path / "imgs" / ".flux_cache" / "latents").rglob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-10])
    ae = FakeAE()
    cache(dataset(cfg), ae)
    assert ae.images == 1
    ae = FakeAE()
    cache(dataset(cfg), ae, skip_cache_check=True)  # existence only
    assert ae.images == 0


class Crash(Exception):
    pass


def test_resume_after_crash_encodes_only_the_rest(tmp_path):
    cfg = basic(tmp_path, n=6)
    ae = FakeAE()

    def dying(x):
        if ae.calls == 3:
            raise Crash()
        return ae(x)

    with pytest.raises(Crash):
        cache(dataset(cfg), dying, batch_size=1)
    done = list((tmp_path / "imgs" / ".flux_cache" / "latents").rglob("*.safetensors"))
    assert len(done) == 3
    again = FakeAE()
    cache(dataset(cfg), again, batch_size=1)
    assert again.images == 3


KILL_SCRIPT = """
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from library.data.dataset import build_datasets
from library.data.config import load_dataset_config
from library.train.caching import encode_latents
def slow(x):
    time.sleep(0.3)
    return F.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]
train, _ = build_datasets(load_dataset_config({cfg!r}), seed=0, progress=False)
train, _ = encode_latents(train, slow, "ae-1", to_disk=True, batch_size=1, progress=False)
"""


def test_resume_after_sigkill(tmp_path):
    cfg = basic(tmp_path, n=8)
    script = tmp_path / "cache_run.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), cfg=str(cfg)))
    proc = subprocess.Popen([sys.executable, str(script)])
    out = tmp_path / "imgs" / ".flux_cache" / "latents"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.rglob("*.safetensors"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.rglob("*.safetensors")))
    assert 3 <= done < 8
    stale = out / "00" / ".leftover.safetensors.tmp999"  # what a kill during a write leaves
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    ae = FakeAE()
    cache(dataset(cfg), ae, batch_size=1)
    assert ae.images == 8 - done and not stale.exists()
    assert len(list(out.rglob("*.safetensors"))) == 8


def test_flip_and_alpha_cached_together(tmp_path):
    d = make_images(tmp_path / "imgs", 2, size=(64, 64), alpha=True)
    cfg = config(tmp_path, f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{d}"
        flip_aug = true
        alpha_mask = true
        num_repeats = 8
        """)
    live, cached = dataset(cfg), dataset(cfg)
    ae = FakeAE()
    cached = cache(cached, ae, batch_size=2)
    assert ae.calls == 2 and ae.images == 4  # one AE batch of both images, in each orientation
    unflipped = {str(it.path): cached.latents.stores[it.uid].get(cached.latents.keys[it.uid])["latents"]
                 for it in cached.items[0]}
    flips = 0
    for i in range(len(live.batches(0))):
        a, b = live.load_batch(0, i), cached.load_batch(0, i)
        assert torch.allclose(ae(a.images), b.latents)  # same flip drawn by the same sample generator
        assert torch.allclose(a.loss_mask, b.loss_mask)
        flips += int(not torch.equal(b.latents[0], unflipped[b.paths[0]]))
    assert 0 < flips < 16
    # toggling alpha_mask off changes the key: re-encoded without a mask
    cfg.write_text(cfg.read_text().replace("alpha_mask = true", "alpha_mask = false"))
    again = FakeAE()
    plain = dataset(cfg)
    plain = cache(plain, again)
    assert again.images > 0 and plain.load_batch(0, 0).loss_mask is None


def test_memory_cache_and_workers(tmp_path):
    cfg = basic(tmp_path)
    ds = cache(dataset(cfg), FakeAE(), to_disk=False)
    assert not (tmp_path / "imgs" / ".flux_cache").exists()
    serial = [b.latents for b in BatchLoader(ds).iter_epoch(0)]
    forked = [b.latents for b in BatchLoader(ds, num_workers=1).iter_epoch(0)]
    assert len(serial) == 2 and all(torch.equal(a, b) for a, b in zip(serial, forked))


def test_persistent_workers_serve_every_epoch_like_the_main_process(tmp_path):
    cfg = basic(tmp_path)
    ds = cache(dataset(cfg), FakeAE(), to_disk=False)
    serial = BatchLoader(ds)
    persistent = BatchLoader(ds, num_workers=1, persistent_workers=True)
    pools = set()
    for epoch in range(3):
        a = [b.latents for b in serial.iter_epoch(epoch)]
        b = [b.latents for b in persistent.iter_epoch(epoch)]
        assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))
        pools.add(id(persistent._loader._iterator))  # the DataLoader keeps its worker iterator when persistent
    assert len(pools) == 1


# ------------------------------------------------------------------------------------------ text encoder

def te_config(tmp_path: Path) -> Path:
    return basic(tmp_path, n=3, extra="shuffle_caption = true\ncaption_dropout_rate = 0.3\nkeep_tokens = 1")


def test_text_cache_covers_dropout_and_shuffle(tmp_path):
    cfg = te_config(tmp_path)
    ds = dataset(cfg, seed=5)
    te = FakeTE()
    ds, n = encode_text(ds, te, "te-1", 6, False, epochs=range(4), to_disk=True, progress=False)
    assert "" in te.encoded and len(set(te.encoded)) == n == len(te.encoded)
    assert n > 4  # shuffled variants, not just one caption per image
    seen_empty = False
    for e in range(4):
        for b in BatchLoader(ds).iter_epoch(e):
            assert b.t5_out is not None
            t5, pooled, mask = FakeTE()(b.captions)
            assert torch.equal(b.t5_out, t5) and torch.equal(b.clip_pooled, pooled)
            seen_empty |= "" in b.captions
    assert seen_empty  # dropout happened and was served from the cache
    again = FakeTE()
    encode_text(dataset(cfg, seed=5), again, "te-1", 6, False, epochs=range(4), to_disk=True, progress=False)
    assert again.encoded == []  # all variants reused
    longer = FakeTE()
    encode_text(dataset(cfg, seed=5), longer, "te-1", 7, False, epochs=range(4), to_disk=True,
                                            progress=False)
    assert len(longer.encoded) == n  # another T5 length: everything again
    masked = FakeTE()
    encode_text(dataset(cfg, seed=5), masked, "te-1", 6, True, epochs=range(4), to_disk=True, progress=False)
    assert len(masked.encoded) == n


def test_text_cache_edited_caption_and_more_epochs(tmp_path):
    cfg = basic(tmp_path, n=3)
    ds = dataset(cfg)
    te = FakeTE()
    ds, _ = encode_text(ds, te, "te-1", 6, False, epochs=range(1), to_disk=True, progress=False)
    assert sorted(te.encoded) == ["tag0, red, blue, green", "tag1, red, blue, green", "tag2, red, blue, green"]
    (tmp_path / "imgs" / "img1.txt").write_text("an edited caption")
    te2 = FakeTE()
    encode_text(dataset(cfg), te2, "te-1", 6, False, epochs=range(1), to_disk=True, progress=False)
    assert te2.encoded == ["an edited caption"]
    te3 = FakeTE()
    encode_text(dataset(cfg), te3, "te-2", 6, False, epochs=range(1), to_disk=True, progress=False)
    assert len(te3.encoded) == 3  # another encoder


def test_uncached_variant_is_left_to_the_trainer(tmp_path, caplog):
    ds = dataset(te_config(tmp_path), seed=1)
    ds, _ = encode_text(ds, FakeTE(), "te-1", 6, False, epochs=range(1), to_disk=False, progress=False)
    later = [b for e in range(1, 6) for b in BatchLoader(ds).iter_epoch(e)]
    assert any(b.t5_out is None for b in later)  # epochs not covered: the trainer must encode live


def test_checkpoint_identity(tmp_path):
    from library.flux.safetensors_io import save_file_atomic

    a = tmp_path / "a.safetensors"
    save_file_atomic({"w": torch.arange(100000, dtype=torch.float32)}, a)
    b = tmp_path / "copy" / "a.safetensors"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert checkpoint_identity(a) == checkpoint_identity(b)  # survives copying
    save_file_atomic({"w": torch.arange(100000, dtype=torch.float32) + 1}, a)
    assert checkpoint_identity(a) != checkpoint_identity(b)  # same header, other weights


def test_tensor_cache_memory_roundtrip():
    c = TensorCache(None, "latents")
    c.put("k", {"latents": torch.ones(2, 2)})
    assert c.has("k", ["latents"]) and torch.equal(c.get("k")["latents"], torch.ones(2, 2))


def test_bad_image_while_caching(tmp_path, caplog):
    import io
    import logging

    from library.data.images import BadImageError

    cfg = basic(tmp_path, n=3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "imgs" / "cut.jpg").write_bytes(buf.getvalue()[:-1500])  # header fine: passes the scan
    with pytest.raises(BadImageError, match="cut.jpg"):
        cache(dataset(cfg), FakeAE())
    train, _ = build_datasets(load_dataset_config(cfg), seed=0, skip_bad_images=True, progress=False)
    ae = FakeAE()
    with caplog.at_level(logging.WARNING):
        train = cache(train, ae)
    assert "cut.jpg" in caplog.text and ae.images == 3
    paths = [p for b in BatchLoader(train).iter_epoch(0) for p in b.paths]
    assert len(paths) == 3 and not any(p.endswith("cut.jpg") for p in paths)


def test_unwritable_cache_folder_is_a_user_error(tmp_path):
    from library.errors import UserError

    cfg = basic(tmp_path, n=1)
    blocker = tmp_path / "imgs" / ".flux_cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(UserError, match="cannot write the latents cache"):
        cache(dataset(cfg), FakeAE())
