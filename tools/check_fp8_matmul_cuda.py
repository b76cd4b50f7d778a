"""GPU check of --fp8_matmul's layer (library.flux.model.Fp8ScaledLinear) on FLUX-sized matmuls.

For each shape (tokens x in -> out of FLUX.1-dev's block Linears at 1024²): the fp8 layer compiled with inductor
against the same layer eager (must agree to bf16 rounding) and against the bf16 Linear (e4m3's own error), and
the time of forward and forward+backward (input gradient only, as for the frozen base) of bf16 `F.linear`
against the compiled fp8 layer (activation quantisation included), CUDA events, median of 20 after 5.

    python3 tools/check_fp8_matmul_cuda.py --out $OUT/fp8_check.json
    python tools/check_fp8_matmul_cuda.py --cpu     # dry run of the same code on tiny shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.flux.model import apply_fp8_matmul  # noqa: E402

# (tokens, in, out): qkv, proj, mlp up, mlp down of a double block (image stream, 4096 tokens); the single
# block's linear1 / linear2 on the joint 4608 tokens.
SHAPES = [(4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
          (4608, 3072, 21504), (4608, 15360, 3072)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _time(fn, device: torch.device, reps: int = 20, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def check(tokens: int, n_in: int, n_out: int, device: torch.device) -> dict:
    torch._dynamo.reset()  # each shape compiles afresh (no recompile limit across shapes)
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out, device=device, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.normal_(0, n_in ** -0.5)
    holder = nn.Module()
    holder.double_blocks = nn.ModuleList([nn.ModuleDict({"l": nn.Linear(n_in, n_out, device=device,
                                                                        dtype=torch.bfloat16)})])
    holder.single_blocks = nn.ModuleList()
    holder.double_blocks[0]["l"].load_state_dict(lin.state_dict())
    holder.requires_grad_(False)
    apply_fp8_matmul(holder)
    f8 = holder.double_blocks[0]["l"]
    compiled = torch.compile(f8, backend="inductor" if device.type == "cuda" else "aot_eager")
    x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16)
    with torch.autocast(device.type, torch.bfloat16):
        y_bf16, y_eager, y_comp = lin(x), f8(x), compiled(x)
    g_bf16, g_eager, g_comp = (torch.autograd.grad(y, x, grad)[0] for y in (y_bf16, y_eager, y_comp))

    def fwd(m):
        def run():
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            with torch.autocast(device.type, torch.bfloat16):
                y = m(x)
            torch.autograd.grad(y, x, grad)
        return run

    flop = 2 * tokens * n_in * n_out
    res = {"shape": [tokens, n_in, n_out],
           "compiled_vs_eager_out": _rel(y_comp, y_eager), "compiled_vs_eager_grad": _rel(g_comp, g_eager),
           "fp8_vs_bf16_out": _rel(y_comp, y_bf16), "fp8_vs_bf16_grad": _rel(g_comp, g_bf16),
           "bf16_fwd_ms": _time(fwd(lin), device), "fp8_fwd_ms": _time(fwd(compiled), device),
           "bf16_fwd_bwd_ms": _time(fwd_bwd(lin), device), "fp8_fwd_bwd_ms": _time(fwd_bwd(compiled), device)}
    res["bf16_fwd_tflops"] = flop / res["bf16_fwd_ms"] / 1e9
    res["fp8_fwd_tflops"] = flop / res["fp8_fwd_ms"] / 1e9
    res["ok"] = res["compiled_vs_eager_out"] < 1e-2 and res["fp8_vs_bf16_out"] < 0.06
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (dry run)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="check only the first N shapes")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    shapes = ([(128, 64, 96), (128, 96, 64)] if device.type == "cpu" else SHAPES)[:args.shapes]
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    results = []
    for s in shapes:
        r = check(*s, device)
        results.append(r)
        print(f"{s}: fwd bf16 {r['bf16_fwd_ms']:.3f} ms ({r['bf16_fwd_tflops']:.0f} TFLOP/s) fp8 {r['fp8_fwd_ms']:.3f} "
              f"ms ({r['fp8_fwd_tflops']:.0f}); fwd+bwd bf16 {r['bf16_fwd_bwd_ms']:.3f} fp8 {r['fp8_fwd_bwd_ms']:.3f} ms; "
              f"fp8 vs bf16 out {r['fp8_vs_bf16_out']:.4f} grad {r['fp8_vs_bf16_grad']:.4f}; compiled vs eager "
              f"{r['compiled_vs_eager_out']:.2e}; ok={r['ok']}", flush=True)
    ok = all(r["ok"] for r in results)
    print("ok" if ok else "FAILED")
    if args.out:
        args.out.write_text(json.dumps({"info": info, "results": results, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
