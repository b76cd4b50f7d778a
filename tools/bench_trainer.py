"""End-to-end trainer benchmark: run `flux_train_network.py` itself and report its own per-step times.

Writes random checkpoints in the real file layouts (BFL transformer and `ae.safetensors` at FLUX.1-dev's full
size; ComfyUI `clip_l` / `t5xxl_fp16` one layer deep but with the real output widths, 768 and 4096, since
their outputs are cached) and a few photo-sized images, then launches the trainer once per run (a fresh
process each, optionally under `torch.cuda.set_per_process_memory_fraction` to emulate a smaller card) with
cached latents and text outputs, batch 1, rank-16 LoRA, AdamW, `--timestep_sampling flux_shift
--model_prediction_type raw` (the anchors' objective). Reported per run: median of the trainer's own step
times (`step_time_s` of its loss CSV) after the warm-up steps, its peak-memory and first-step log lines,
the --max_vram_gib choice, and the wall time of the whole process. The loss curves stay in the JSON.

A run is `name=res:steps[:frac GiB]:flag,flag,...` (flags without the leading --, `=` as `~`), e.g.
`ckpt1024=1024:13::gradient_checkpointing,torch_compile` or `vram24=1024:13:24:max_vram_gib~24,torch_compile`.

    python3 tools/bench_trainer.py --work /tmp/bt --out $OUT/trainer.json            # default runs (GPU)
    python tools/bench_trainer.py --tiny --work /tmp/bt_tiny                          # CPU dry run
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

COMMON = ["--network_module", "networks.lora_flux", "--network_dim", "16", "--network_alpha", "16",
          "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
          "--max_grad_norm", "1.0", "--mixed_precision", "bf16", "--timestep_sampling", "flux_shift",
          "--model_prediction_type", "raw", "--guidance_scale", "1.0", "--seed", "1", "--cache_latents",
          "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
          "--max_data_loader_n_workers", "0", "--save_precision", "bf16", "--console_log_simple"]
DEFAULT_RUNS = [
    "ckpt1024=1024:13::gradient_checkpointing,torch_compile",
    "ckpt512=512:13::gradient_checkpointing,torch_compile",
    "fp8ckpt1024=1024:13::gradient_checkpointing,torch_compile,fp8_base",
    "fp8swap1024=1024:8::gradient_checkpointing,torch_compile,fp8_base,blocks_to_swap~18",
    "vram80=1024:13:80:max_vram_gib~80,torch_compile",
    "vram24=1024:13:24:max_vram_gib~24,torch_compile",
    "vram16=1024:13:16:max_vram_gib~16,torch_compile",
    "vram12=1024:13:12:max_vram_gib~12,torch_compile",
]
TINY_RUNS = ["plain=64:4::gradient_checkpointing", "vram=64:4::max_vram_gib~12,gradient_checkpointing_blocks~2"]


@dataclass
class RunResult:
    name: str
    spec: str
    ok: bool = False
    median_step_ms: float = math.nan
    step_times_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_gib: float = math.nan
    first_step_s: float = math.nan
    first_step_after_launch_s: float = math.nan
    choice: str = ""
    compile_cache: str = ""
    setup_s: dict[str, float] = field(default_factory=dict)  # load / caches / to_device
    wall_s: float = math.nan
    error: str = ""
    argv: list[str] = field(default_factory=list)


def write_checkpoints(work: Path, tiny: bool) -> dict[str, Path]:
    """Transformer + AE at full size (or the tiny set), CLIP-L / T5 shallow with their real output widths."""
    from library.flux.safetensors_io import save_file_atomic
    from library.flux.text_encoders import ClipSizes, T5Sizes
    from library.flux.tiny import write_tiny_checkpoints
    from library.flux.tiny_text import tiny_clip_state_dict, tiny_t5_state_dict

    work.mkdir(parents=True, exist_ok=True)
    if tiny:
        t = write_tiny_checkpoints(work / "ckpt")
        return {"transformer": t.transformer, "ae": t.ae, "clip_l": t.clip_l, "t5xxl": t.t5xxl}
    import torch

    from bench_model import FLUX_DEV, write_random_checkpoint
    from library.flux.autoencoder import AutoEncoder, AutoEncoderParams
    from library.flux.tiny import _randomize

    out = {"transformer": work / "flux1-dev-random.safetensors", "ae": work / "ae.safetensors",
           "clip_l": work / "clip_l.safetensors", "t5xxl": work / "t5xxl_fp16.safetensors"}
    if not out["transformer"].exists():
        seconds = write_random_checkpoint(out["transformer"], FLUX_DEV, torch.device("cuda"))
        print(f"writing the transformer: {seconds:.1f} s", flush=True)
    if not out["ae"].exists():
        with torch.device("meta"):
            ae = AutoEncoder(AutoEncoderParams(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16))
        save_file_atomic({k: v.float().contiguous() for k, v in _randomize(ae, 7).items()}, out["ae"])
    if not out["clip_l"].exists():
        save_file_atomic(tiny_clip_state_dict(1, ClipSizes(49408, 768, 1, 3072, 77, 768)), out["clip_l"])
    if not out["t5xxl"].exists():
        save_file_atomic(tiny_t5_state_dict(1, T5Sizes(32128, 4096, 1, 64, 64, 10240, 32)), out["t5xxl"])
    return out


def write_images(work: Path, n: int, size: int) -> Path:
    """`n` smooth random RGB images (JPEG) with captions in work/images."""
    import numpy as np
    from PIL import Image

    folder = work / f"images{size}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if (folder / f"{i:02d}.jpg").exists():
            continue
        small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:02d}.jpg", quality=92)
        (folder / f"{i:02d}.txt").write_text(f"a random picture number {i}")
    return folder


def dataset_toml(work: Path, images: Path, res: int) -> Path:
    path = work / f"data{res}.toml"
    path.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {res}\nbatch_size = 1\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images}"\n')
    return path


def parse_spec(spec: str) -> tuple[str, int, int, float | None, list[str]]:
    name, _, rest = spec.partition("=")
    parts = rest.split(":")
    if len(parts) != 4 or not name:
        raise SystemExit(f"bad run {spec!r}: expected name=res:steps:[GiB]:flag,flag")
    flags = []
    for f in filter(None, parts[3].split(",")):
        key, _, value = f.partition("~")
        flags += [f"--{key}"] + ([value] if value else [])
    return name, int(parts[0]), int(parts[1]), float(parts[2]) if parts[2] else None, flags


_FIRST = re.compile(r"first step: ([\d.]+) s \(([\d.]+) s after launch\)")
_CACHE = re.compile(r"compile cache: (.*)$", re.M)
_SETUP = re.compile(r"setup: models loaded in ([\d.]+) s, caches ([\d.]+) s, transformer to \w+ in ([\d.]+) s")
_PEAK = re.compile(r"peak GPU memory ([\d.]+) GiB")
_CHOICE = re.compile(r"--max_vram_gib [\d.]+: (.*)$", re.M)


def run_trainer(spec: str, ck: dict[str, Path], work: Path, warmup: int, timeout: float, tiny: bool) -> RunResult:
    name, res, steps, gib, flags = parse_spec(spec)
    r = RunResult(name, spec)
    out = work / "runs" / name
    toml = dataset_toml(work, write_images(work, 4, max(res, 64)), res)
    argv = ["--pretrained_model_name_or_path", str(ck["transformer"]), "--ae", str(ck["ae"]), "--clip_l",
            str(ck["clip_l"]), "--t5xxl", str(ck["t5xxl"]), "--dataset_config", str(toml), "--output_dir", str(out),
            "--output_name", "lora", "--max_train_steps", str(steps), *COMMON, *flags]
    if tiny:
        argv += ["--t5xxl_max_token_length", "16"]
    r.argv = argv
    prelude = "import runpy, sys, torch\n"
    if gib:  # emulate a card of `gib` GiB on a bigger one
        prelude += (f"torch.cuda.set_per_process_memory_fraction(min(1.0, {gib} * 2**30 / "
                    "torch.cuda.get_device_properties(0).total_memory))\n")
    prelude += ("sys.argv = ['flux_train_network.py'] + sys.argv[1:]\n"
                "runpy.run_path('flux_train_network.py', run_name='__main__')\n")
    log_path = work / "runs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.run([sys.executable, "-c", prelude, *argv], cwd=REPO, stdout=logf,
                                  stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -9
    r.wall_s = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if (m := _FIRST.search(text)):
        r.first_step_s, r.first_step_after_launch_s = float(m.group(1)), float(m.group(2))
    if (m := _PEAK.search(text)):
        r.peak_gib = float(m.group(1))
    if (m := _SETUP.search(text)):
        r.setup_s = dict(zip(("load", "caches", "to_device"), map(float, m.groups())))
    if (m := _CACHE.search(text)):
        r.compile_cache = m.group(1).strip()
    if (m := _CHOICE.search(text)):
        r.choice = m.group(1).strip()
    csv_path = out / "lora_loss.csv"
    if csv_path.exists():
        rows = list(csv.DictReader(csv_path.open()))
        r.losses = [float(x["loss"]) for x in rows]
        r.step_times_ms = [1e3 * float(x["step_time_s"]) for x in rows if x.get("step_time_s")]
        timed = r.step_times_ms[warmup:]
        r.median_step_ms = statistics.median(timed) if timed else math.nan
    r.ok = rc == 0 and bool(r.losses) and all(math.isfinite(x) for x in r.losses)
    if not r.ok:
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        r.error = f"exit {rc}: " + " | ".join(tail)[-600:]
    return r


def main(argv: list[str] | None = None) -> list[RunResult]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for checkpoints, images, caches and runs")
    ap.add_argument("--runs", nargs="+", default=None, help="run specs (see above); default: the goals' runs")
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoints on the CPU (dry run of the same path)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--run-timeout", type=float, default=240)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip runs once this much time has passed")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after every run)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    runs = args.runs or (TINY_RUNS if args.tiny else DEFAULT_RUNS)
    for spec in runs:
        parse_spec(spec)  # fail on a typo before the slow part
    t = time.perf_counter()
    ck = write_checkpoints(args.work, args.tiny)
    info = {"argv": sys.argv, "checkpoints_s": time.perf_counter() - t}
    try:
        import torch

        info.update(torch=torch.__version__, device=torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else "cpu")
    except Exception:  # noqa: BLE001 - informational
        pass
    results: list[RunResult] = []
    for spec in runs:
        if time.perf_counter() - start > args.budget_s:
            results.append(RunResult(spec.partition("=")[0], spec, error="skipped: time budget"))
            continue
        r = run_trainer(spec, ck, args.work, args.warmup, args.run_timeout, args.tiny)
        results.append(r)
        print(f"[{r.name}] ok={r.ok} median {r.median_step_ms:.1f} ms, peak {r.peak_gib:.2f} GiB, first step "
              f"{r.first_step_s:.1f} s ({r.first_step_after_launch_s:.1f} s after launch), wall {r.wall_s:.0f} s"
              + (f", chose {r.choice}" if r.choice else "") + (f", {r.error}" if r.error else ""), flush=True)
        if args.out:
            args.out.write_text(json.dumps({"info": info, "results": [asdict(x) for x in results]}, indent=1))
    print("\n| run | median step ms | peak GiB | first step s | after launch s | choice |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r.name} | {r.median_step_ms:.1f} | {r.peak_gib:.2f} | {r.first_step_s:.1f} | "
              f"{r.first_step_after_launch_s:.1f} | {r.choice or ''} {'' if r.ok else 'FAILED ' + r.error[:200]} |")
    return results


if __name__ == "__main__":
    main()
