"""Data-path benchmarks: latent-caching throughput with the full-size FLUX AE, and loader throughput from a disk cache.

  python tools/bench_data.py caching --device cuda --dtype bf16 --n 64 --batch 1,4,8   # images/s at 1024^2
  taskset -c 0,1 python tools/bench_data.py loader --n 48 --batch 1                # batches/s on 2 cores

Images are random-noise JPEGs written to a temporary folder (no data set needed); the AE has FLUX's real
sizes (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 16) with seeded random weights, which costs what the real
weights cost. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.dataset import BatchLoader, build_datasets  # noqa: E402
from library.train.caching import ae_encode_fn, encode_latents, encode_text  # noqa: E402
from library.data.config import load_dataset_config  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth noise, so the JPEG is photo-sized (~0.3-0.6 MB), not incompressible
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg", quality=92)
        (folder / f"{i:04d}.txt").write_text(f"image {i}, a random texture, colourful")


def write_config(root: Path, res: int, batch: int) -> Path:
    cfg = root / "data.toml"
    cfg.write_text(f'[general]\nresolution = {res}\nbatch_size = {batch}\ncaption_extension = ".txt"\n'
                   f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{root / "imgs"}"\n')
    return cfg


def full_size_ae(device: str, dtype: torch.dtype):
    from library.flux.autoencoder import AutoEncoder, AutoEncoderParams

    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16))
    return ae.to(device, dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_caching(a: argparse.Namespace) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    ae = full_size_ae(a.device, dtype)
    for bs in a.batch:
        x = torch.rand(bs, 3, a.res, a.res, device=a.device, dtype=dtype) * 2 - 1
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for _ in range(2):
                ae.encode(x)
            sync(a.device)
            t = time.perf_counter()
            for _ in range(a.reps):
                ae.encode(x)
            sync(a.device)
        rate = bs * a.reps / (time.perf_counter() - t)
        print(json.dumps({"what": "ae_encode_only", "res": a.res, "batch": bs, "dtype": a.dtype,
                          "images_per_s": round(rate, 2),
                          "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                          if a.device.startswith("cuda") else None}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_images(root / "imgs", a.n, a.res)
        gen_s = time.perf_counter() - t
        encode = ae_encode_fn(ae, a.device, dtype)
        for bs in a.batch:
            train, _ = build_datasets(load_dataset_config(write_config(root, a.res, 1)), seed=0, progress=False)
            t = time.perf_counter()
            train, _ = encode_latents(train, encode, "bench-ae", to_disk=True, cache_dir=root / f"cache{bs}",
                                      batch_size=bs, progress=False, num_threads=a.threads)
            sync(a.device)
            dt = time.perf_counter() - t
            print(json.dumps({"what": "cache_latents_end_to_end", "n": a.n, "res": a.res, "vae_batch_size": bs,
                              "dtype": a.dtype, "decode_threads": a.threads, "seconds": round(dt, 2),
                              "images_per_s": round(a.n / dt, 2),
                              "includes": "hash + JPEG decode + to tensor + AE encode + safetensors write",
                              "image_gen_s": round(gen_s, 1)}), flush=True)


def bench_loader(a: argparse.Namespace) -> None:
    """Batches/s from a disk cache of bf16 latents [16,128,128] and T5 outputs [512,4096] (real sizes)."""
    torch.set_num_threads(a.threads)

    def fake_ae(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16].to(torch.bfloat16)

    def fake_te(prompts: list[str]):
        b = len(prompts)
        return (torch.randn(b, 512, 4096).to(torch.bfloat16), torch.randn(b, 768).to(torch.bfloat16),
                torch.ones(b, 512, dtype=torch.long))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "imgs", a.n, 256)  # upscaled to the 1024^2 bucket when cached; size is irrelevant here
        train, _ = build_datasets(load_dataset_config(write_config(root, a.res, a.batch)), seed=0, progress=False)
        train, _ = encode_latents(train, fake_ae, "fake", to_disk=True, cache_dir=root / "cache", progress=False)
        train, _ = encode_text(train, fake_te, "fake", 512, False, range(1), to_disk=True, cache_dir=root / "cache",
                                 progress=False)
        for workers in a.workers:
            loader = BatchLoader(train, num_workers=workers)
            n, t = 0, time.perf_counter()
            for epoch in range(a.epochs):
                for batch in loader.iter_epoch(epoch):
                    assert batch.latents is not None and batch.t5_out is not None
                    n += 1
            dt = time.perf_counter() - t
            print(json.dumps({"what": "loader_from_disk_cache", "workers": workers, "batch": a.batch, "res": a.res,
                              "batches": n, "batches_per_s": round(n / dt, 1),
                              "ms_per_batch": round(1000 * dt / n, 1), "torch_threads": a.threads}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("caching")
    c.add_argument("--device", default="cuda")
    c.add_argument("--dtype", default="bf16")
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--res", type=int, default=1024)
    c.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    c.add_argument("--reps", type=int, default=5)
    c.add_argument("--threads", type=int, default=8)
    ld = sub.add_parser("loader")
    ld.add_argument("--n", type=int, default=48)
    ld.add_argument("--res", type=int, default=1024)
    ld.add_argument("--batch", type=int, default=1)
    ld.add_argument("--epochs", type=int, default=2)
    ld.add_argument("--threads", type=int, default=2)
    ld.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    a = p.parse_args()
    bench_caching(a) if a.cmd == "caching" else bench_loader(a)


if __name__ == "__main__":
    main()
