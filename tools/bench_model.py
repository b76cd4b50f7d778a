#!/usr/bin/env python
"""GPU benchmark of the FLUX transformer at full FLUX.1-dev size: load time, forward time, peak memory.

    python tools/bench_model.py --work DIR [--out results.json] [--repeats 5] [--modes bf16,fp8]

Writes random weights in the real BFL layout (hidden 3072, 19 double + 38 single blocks, guidance embed;
~23.8 GB bf16) to DIR/flux1-dev-random.safetensors tensor by tensor (never the whole state dict in memory),
then for each mode loads it with `load_transformer` (bf16, or fp8 e4m3 block weights) and times one
1024x1024 forward (4096 image tokens + 512 text tokens, batch 1) with CUDA events, after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.flux.loading import load_transformer  # noqa: E402
from library.flux.math import make_img_ids, make_txt_ids  # noqa: E402
from library.flux.model import Flux, FluxParams  # noqa: E402

FLUX_DEV = FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                      mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, qkv_bias=True,
                      guidance_embed=True)
GiB = 1024 ** 3


def write_random_checkpoint(path: Path, params: FluxParams, device: torch.device) -> float:
    """Stream a bf16 safetensors file of random weights, one tensor at a time. Returns seconds taken."""
    start = time.perf_counter()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    gen = torch.Generator(device).manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            if len(shape) >= 2:  # unit-gain weights keep activations finite at full depth
                t = torch.randn(shape, generator=gen, device=device) * shape[1] ** -0.5
            elif name.endswith(".scale"):
                t = torch.ones(shape, device=device)
            else:
                t = 0.01 * torch.randn(shape, generator=gen, device=device)
            f.write(t.to(torch.bfloat16).cpu().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)
    return time.perf_counter() - start


def inputs(device: torch.device, p: FluxParams) -> dict:
    gen = torch.Generator(device).manual_seed(1)
    h = w = 1024 // 16  # packed token grid of a 1024x1024 image
    bf = torch.bfloat16
    return dict(img=torch.randn(1, h * w, p.in_channels, generator=gen, device=device, dtype=bf),
                img_ids=make_img_ids(1, h, w).to(device), txt=torch.randn(1, 512, p.context_in_dim,
                                                                          generator=gen, device=device, dtype=bf),
                txt_ids=make_txt_ids(1, 512).to(device), timesteps=torch.full((1,), 0.5, device=device, dtype=bf),
                y=torch.randn(1, p.vec_in_dim, generator=gen, device=device, dtype=bf),
                guidance=torch.full((1,), 3.5, device=device, dtype=bf))


@torch.no_grad()
def bench_mode(path: Path, mode: str, device: torch.device, repeats: int) -> dict:
    """`mode`: "bf16" or "fp8", optionally "+swapN" (kohya --blocks_to_swap N)."""
    fp8 = mode.startswith("fp8")
    swap = int(mode.split("+swap")[1]) if "+swap" in mode else 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    model = load_transformer(path, "cpu" if swap else device, torch.bfloat16, fp8=fp8)
    model.requires_grad_(False)
    if swap:
        model.enable_block_swap(swap, device)
    torch.cuda.synchronize(device)
    load_s = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated(device) / GiB
    load_peak_gib = torch.cuda.max_memory_allocated(device) / GiB
    inp = inputs(device, model.params)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # warm-up: kernels selected, allocator filled
        out = model(**inp)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = model(**inp)
        b.record()
        torch.cuda.synchronize(device)
        times.append(a.elapsed_time(b))
    result = {"mode": mode, "load_s": round(load_s, 2),
              "weights_gib": round(weights_gib, 2), "load_peak_gib": round(load_peak_gib, 2),
              "forward_ms_median": round(statistics.median(times), 1), "forward_ms_all": [round(t, 1) for t in times],
              "forward_peak_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2),
              "output_finite": bool(torch.isfinite(out).all()), "output_std": float(out.float().std())}
    del model, out
    return result


def check_block_swap(device: torch.device) -> dict:
    """Outputs and gradients with block swap (weights really moving host <-> GPU) equal those without."""
    p = FluxParams(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=256,
                   mlp_ratio=4.0, num_heads=2, depth=3, depth_single_blocks=4, qkv_bias=True, guidance_embed=True)
    torch.manual_seed(0)
    model = Flux(p)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.normal_(0, t.shape[-1] ** -0.5 if t.ndim == 2 else 0.1)
    gen = torch.Generator().manual_seed(0)
    inp = dict(img=torch.randn(2, 12, 64, generator=gen), img_ids=make_img_ids(2, 3, 4),
               txt=torch.randn(2, 5, 64, generator=gen), txt_ids=make_txt_ids(2, 5), timesteps=torch.rand(2),
               y=torch.randn(2, 64, generator=gen), guidance=torch.full((2,), 3.5))
    inp = {k: v.to(device) for k, v in inp.items()}

    def step():
        model.zero_grad()
        img = inp["img"].clone().requires_grad_(True)
        out = model(**{**inp, "img": img})
        (out ** 2).mean().backward()
        grads = [q.grad.to("cpu") for q in model.parameters() if q.requires_grad]
        return out.detach().cpu(), img.grad.cpu(), grads

    model.requires_grad_(False)  # frozen base (as under LoRA) plus trainable weights inside swapped blocks
    for block in (model.double_blocks[2], model.single_blocks[3]):
        for q in block.parameters():
            if q.ndim == 1:
                q.requires_grad_(True)
    model.to(device)
    ref = step()
    result = {}
    model.enable_block_swap(4, device)  # 2 double + 4 single
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        got = step()
        diff = max([(a - b).abs().max().item() for a, b in zip(ref[:2], got[:2])]
                   + [(a - b).abs().max().item() for a, b in zip(ref[2], got[2])])
        on_gpu = [n for n, q in model.named_parameters() if q.device.type == "cuda" and not q.requires_grad
                  and n.startswith(tuple(f"{b}." for b in model.block_swap.names))]
        result[f"checkpointing={ckpt}"] = {"max_abs_diff": diff, "swapped_params_left_on_gpu": len(on_gpu)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the ~24 GB random checkpoint")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="bf16,fp8", help='comma list of bf16, fp8, bf16+swap18, ...')
    parser.add_argument("--check-swap", action="store_true", help="only check block swap on the GPU (small model)")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.check_swap:
        print(json.dumps(check_block_swap(device)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "flux1-dev-random.safetensors"
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "shape": "FLUX.1-dev: hidden 3072, 19 double + 38 single blocks; 1024x1024 = 4096 img + 512 txt"}
    if not path.exists():
        results["write_s"] = round(write_random_checkpoint(path, FLUX_DEV, device), 1)
    results["file_gib"] = round(path.stat().st_size / GiB, 2)
    print(json.dumps(results), flush=True)
    results["runs"] = []
    for mode in filter(None, args.modes.split(",")):  # --modes "" only writes the checkpoint
        r = bench_mode(path, mode, device, args.repeats)
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
