#!/usr/bin/env python
"""On a GPU: block swap (side-stream prefetch in forward and backward) gives the plain path's gradients, and
what a pinned host-to-device copy runs at (the floor of block swap's cost).

A mid-size FLUX (hidden 1536, 4 double + 8 single blocks, bf16) with networks.lora_flux (rank 16, up weights
random so every LoRA gradient is non-zero), one step's loss and LoRA gradients: plain, the plain path again
(run-to-run reference), and --blocks_to_swap 4 with and without prefetch, each with and without
checkpointing. It fails (exit 1) when a swapped run differs from the plain one by more than the plain path
differs from itself (bit-identical when the plain path is).

    python3 tools/check_block_swap_cuda.py --out $OUT/swap_check.json
    python tools/check_block_swap_cuda.py --cpu     # the same comparisons on the CPU (prefetch bookkeeping)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_step import build_model, inject_lora_network  # noqa: E402
from library.flux.model import FluxParams  # noqa: E402

MID = FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=1536,
                 mlp_ratio=4.0, num_heads=12, depth=4, depth_single_blocks=8, qkv_bias=True, guidance_embed=True)


def h2d_gbps(device: torch.device, gib: float = 1.0, reps: int = 5) -> float:
    """Pinned host -> device copy rate (GB/s), median of `reps` copies of `gib` GiB."""
    host = torch.empty(int(gib * 2 ** 30), dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    rates = []
    for _ in range(reps + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        rates.append(host.numel() / (time.perf_counter() - t0) / 1e9)
    return sorted(rates[1:])[reps // 2]


def one_step(model, params, inp: dict, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    with torch.autocast(inp["img"].device.type, dtype=dtype, enabled=inp["img"].device.type == "cuda"):
        out = model(**inp)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in params]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (float32, tiny tokens)")
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (a 512² image; 16 with --cpu)")
    ap.add_argument("--swap", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.cpu else "cuda")
    dtype = torch.float32 if a.cpu else torch.bfloat16
    tokens = 16 if a.cpu else a.tokens
    torch.manual_seed(0)
    model = build_model(MID, device, dtype)
    params, _, impl, network = inject_lora_network(model, 16, 16.0, "ours")
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 1e-3)
    model.train()
    g = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5)
    ids = torch.zeros(1, tokens, 3)
    ids[0, :, 1] = torch.arange(tokens) // side
    ids[0, :, 2] = torch.arange(tokens) % side
    inp = dict(img=torch.randn(1, tokens, 64, generator=g), img_ids=ids,
               txt=torch.randn(1, 64, 4096, generator=g), txt_ids=torch.zeros(1, 64, 3),
               timesteps=torch.full((1,), 0.5), y=torch.randn(1, 768, generator=g), guidance=torch.full((1,), 3.5))
    inp = {k: v.to(device, dtype if k in ("img", "txt", "y") else torch.float32) for k, v in inp.items()}
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "lora": impl, "lora_params": len(params), "runs": {}}
    if device.type == "cuda":
        report["h2d_pinned_gbps"] = round(h2d_gbps(device), 1)
    ok = True
    for ckpt in (False, True):
        model.enable_gradient_checkpointing() if ckpt else model.disable_gradient_checkpointing()
        if model.block_swap is not None:
            model.block_swap.remove()
            model.block_swap = None
            model.to(device)
        loss0, g0 = one_step(model, params, inp, dtype)
        loss1, g1 = one_step(model, params, inp, dtype)
        noise = max((x - y).abs().max().item() for x, y in zip(g0, g1))
        runs = {}
        for prefetch in (True, False):
            model.enable_block_swap(a.swap, device, prefetch=prefetch)
            loss, gs = one_step(model, params, inp, dtype)
            assert not model.block_swap.resident, "a swapped block stayed on the device after backward"
            diff = max((x - y).abs().max().item() for x, y in zip(g0, gs))
            good = diff <= noise and abs(loss - loss0) <= abs(loss1 - loss0)
            ok &= good
            runs[f"swap{a.swap}{'' if prefetch else '_noprefetch'}"] = {"loss": loss, "max_grad_diff": diff,
                                                                          "ok": good}
        nonzero = all(x.abs().sum().item() > 0 for x in g0)
        ok &= nonzero
        report["runs"]["ckpt" if ckpt else "plain"] = {"loss": loss0, "rerun_max_grad_diff": noise,
                                                        "all_grads_nonzero": nonzero, **runs}
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=1), flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
