"""library/train/caching.py: caching split across 2 gloo ranks, to disk and in memory.

Each image and caption variant is encoded exactly once over all ranks, and before step 1 every rank reads
the complete cache (every batch of every epoch comes with its latents and text-encoder outputs).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from library.data.cache import TensorCache
from library.data.config import load_dataset_config
from library.data.dataset import build_datasets
from library.train.caching import Ranks, all_gather_object, cache_latents, cache_text, share_memory_entries

EPOCHS = 3


def _config(tmp: Path) -> Path:
    folder = tmp / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # 5 images: the shares of 2 ranks differ in size (3 and 2)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text(f"img {i}, red, blue, green")
    path = tmp / "data.toml"
    path.write_text(textwrap.dedent(f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        shuffle_caption = true
        [[datasets]]
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "{folder}"
        """))
    return path


def _latent_encoder(log: list[int]):
    def encode(x: torch.Tensor) -> torch.Tensor:
        log.append(x.shape[0])
        return x[:, :1].repeat(1, 16, 1, 1)[..., ::8, ::8] + 0.5
    return encode


def _text_encoder(log: list[str]):
    def encode(prompts: list[str]):
        log.extend(prompts)
        n = len(prompts)
        return torch.full((n, 4, 8), float(n)), torch.zeros(n, 4), torch.ones(n, 4)
    return encode


def _worker(rank: int, world: int, tmp: str, to_disk: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ranks = Ranks(rank, world, dist.barrier, all_gather_object) if world > 1 else Ranks()
        dataset, _ = build_datasets(load_dataset_config(_config_path(tmp)), seed=1, progress=False)
        images, captions = [], []
        dataset, lat = cache_latents(dataset, _latent_encoder(images), "ae", to_disk, ranks, progress=False)
        dataset, txt = cache_text(dataset, _text_encoder(captions), "te", 4, False, range(EPOCHS), to_disk, ranks,
                                  progress=False)
        complete = all(b is not None and b.latents is not None and b.t5_out is not None
                       for e in range(EPOCHS) for b in (dataset.load_batch(e, i) for i in range(len(dataset))))
        Path(tmp, f"rank{rank}.json").write_text(json.dumps({
            "images": sum(images), "captions": captions, "latent_report": [lat.encoded, lat.entries],
            "text_report": [txt.encoded, txt.entries], "complete": complete,
            "variants": dataset.caption_variants(range(EPOCHS))}))
    finally:
        dist.destroy_process_group()


def _config_path(tmp: str) -> Path:
    path = Path(tmp) / "data.toml"
    return path if path.exists() else _config(Path(tmp))


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_two_ranks_encode_each_item_once_and_both_see_everything(tmp_path: Path, to_disk: bool) -> None:
    _config(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path), to_disk), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["images"] + r1["images"] == 5 and {r0["images"], r1["images"]} == {2, 3}  # each image once
    assert not set(r0["captions"]) & set(r1["captions"])  # no caption encoded on both ranks
    variants = set(r0["variants"])
    assert len(variants) > 5  # shuffle_caption: several variants per image over the epochs
    assert sorted(r0["captions"] + r1["captions"]) == sorted(variants)  # every variant exactly once
    for r in (r0, r1):
        assert r["complete"]  # every batch of every epoch reads latents and T5 outputs from the cache
        assert r["latent_report"][1] == 5 and r["text_report"][1] == len(variants)
    assert r0["latent_report"][0] + r1["latent_report"][0] == 5
    assert r0["text_report"][0] + r1["text_report"][0] == len(variants)
    if to_disk:
        assert len(list((tmp_path / "imgs" / ".flux_cache" / "latents").rglob("*.safetensors"))) == 5


def test_one_process_encodes_everything(tmp_path: Path) -> None:  # the split's reference (no process group)
    dataset, _ = build_datasets(load_dataset_config(_config(tmp_path)), seed=1, progress=False)
    images: list[int] = []
    _, report = cache_latents(dataset, _latent_encoder(images), "ae", False, Ranks(), progress=False)
    assert sum(images) == 5 and (report.encoded, report.entries) == (5, 5)


def test_sharing_memory_entries_in_chunks() -> None:
    """Three fake ranks in one process: every store ends with all entries, whatever the chunking."""
    stores = [TensorCache(None, "text") for _ in range(3)]
    for r, s in enumerate(stores):
        for i in range(r * 3 + 1):  # 1, 4 and 7 entries: uneven, so the ranks need different round counts
            s.put(f"k{r}-{i}", {"t": torch.full((2,), float(i))})
    calls: list[list] = [[] for _ in stores]

    # a synchronous all-gather over the three "ranks": run them round by round
    import threading
    barrier = threading.Barrier(3)
    slots: list = [None] * 3

    def gather_for(rank: int):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            calls[rank].append(1)
            return out
        return gather

    threads = [threading.Thread(target=share_memory_entries, args=(s, Ranks(r, 3, barrier.wait, gather_for(r)), 2))
               for r, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    keys = {f"k{r}-{i}" for r in range(3) for i in range(r * 3 + 1)}
    for s in stores:
        assert set(s.memory_entries()) == keys
    assert len(calls[0]) == len(calls[2]) == 1 + 4  # one round count, then ceil(7 / 2) rounds for everyone
