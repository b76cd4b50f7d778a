"""Memory options: selective checkpointing and block swap change no gradient bit; the memory model
reproduces its device measurements and picks setups that fit; --max_vram_gib and --dry_run at the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.flux.math import make_img_ids, make_txt_ids
from library.flux.model import Flux
from library.flux.tiny import tiny_flux_params
from library.train import memory_plan as P
from networks import lora_flux
from train_helpers import base_args, data, train_in_process  # noqa: F401 (data: a fixture)


def _model(seed: int = 0) -> tuple[Flux, lora_flux.LoRANetwork]:
    torch.manual_seed(seed)
    model = Flux(tiny_flux_params())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.requires_grad_(False)
    network = lora_flux.create_network(1.0, 4, 4, model, None, None)
    network.apply_to()
    for adapter in network.adapters():  # non-zero up: both LoRA factors get gradients
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.05)
    return model, network


def _inputs(p) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(img=torch.randn(2, 12, p.in_channels, generator=g), img_ids=make_img_ids(2, 4, 3),
                txt=torch.randn(2, 5, p.context_in_dim, generator=g), txt_ids=make_txt_ids(2, 5),
                timesteps=torch.tensor([0.4, 0.7]), y=torch.randn(2, p.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5, 3.5]))


def _grads(model: Flux, network, inp: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = list(network.parameters())
    for p in params:
        p.grad = None
    out = model(**inp)
    (out.float() ** 2).mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


def test_selective_checkpointing_and_block_swap_give_bit_identical_gradients() -> None:
    model, network = _model()
    inp = _inputs(model.params)
    out0, g0 = _grads(model, network, inp)
    assert len(g0) == 2 * len(network.adapters()) and all(g.abs().sum() > 0 for g in g0)

    def same(tag: str) -> None:
        out, g = _grads(model, network, inp)
        assert torch.equal(out, out0), tag
        assert all(torch.equal(a, b) for a, b in zip(g, g0)), tag

    for k in (None, 0, 1, 3):  # all blocks, none, the first double block, both double + one single
        model.enable_gradient_checkpointing(blocks=k)
        assert model.checkpointed_blocks == (4 if k is None else k)
        same(f"checkpointing {k}")
    model.disable_gradient_checkpointing()
    model.enable_block_swap(2, "cpu")  # 1 double + 2 single blocks swapped (on the CPU: same tensors moved)
    same("swap")
    model.enable_gradient_checkpointing(blocks=2)
    same("swap + checkpointing 2")
    # Negative control: the comparison sees a change in the computation.
    network.set_multiplier(0.5)
    _, g = _grads(model, network, inp)
    assert not all(torch.equal(a, b) for a, b in zip(g, g0))


def test_checkpointing_blocks_out_of_range_is_a_user_error() -> None:
    model, _ = _model()
    with pytest.raises(UserError, match="gradient_checkpointing_blocks 5: this model has 4 blocks"):
        model.enable_gradient_checkpointing(blocks=5)
    with pytest.raises(UserError, match="cpu_offload_checkpointing needs every block"):
        model.enable_gradient_checkpointing(cpu_offload=True, blocks=2)


# -- the memory model ----------------------------------------------------------------------------------------
DEV_PARAMS = __import__("library.flux.model", fromlist=["FluxParams"]).FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
    num_heads=24, depth=19, depth_single_blocks=38, qkv_bias=True, guidance_embed=True)
DEV = P.workload_for(DEV_PARAMS, 4096, 512, 1, 16, True)


def _at(res: int, **kw) -> P.Workload:
    from dataclasses import replace

    return replace(DEV, img_tokens=(res // 16) ** 2, **kw)


def test_workload_counts_match_the_model() -> None:
    """FLUX.1-dev: 11.9 B parameters, kohya's 304-module rank-16 LoRA has 76.58 M (perf-anchors.md)."""
    w = DEV
    total = w.n_double * sum((w.block_linear_params[0], w.block_other_params[0])) + \
        w.n_single * sum((w.block_linear_params[1], w.block_other_params[1])) + w.other_params
    assert abs(total / 11.90e9 - 1) < 0.01 and w.lora_params == 76_578_816
    assert abs(P.forward_flops(w) / 74.76e12 - 1) < 0.01  # the anchors' F at 1024²


@pytest.mark.parametrize("res,blocks,compiled,peak,ms", [
    # Device measurements it was fitted to (BENCHMARKS.md, H200, step bench, rank 16, batch 1).
    (1024, 57, True, 25.57, 513.7), (512, 57, True, 23.99, 199.4), (1024, 0, True, 53.29, 364.4),
    (512, 0, True, 33.24, None), (1024, 57, False, 25.45, 710.3), (1024, 0, False, 59.26, None)])
def test_memory_model_reproduces_measured_peaks(res, blocks, compiled, peak, ms) -> None:
    p = P.predict(_at(res, compiled=compiled), P.Choice(blocks, False, 0))
    assert abs(p.peak_gib / peak - 1) < 0.05, p
    if ms:
        assert abs(1e3 * p.step_s / ms - 1) < 0.10, p


H100 = P.CALIBRATIONS["H100"]


@pytest.mark.parametrize("res,blocks,compiled,fp8,swap,rank,batch,peak,ms", [
    # H100 measurements, 2026-12-07 (BENCHMARKS.md, issue 11): trainer end to end (compiled) and the step
    # bench's eager cost curves. 512² steps are host-bound on that machine: their times are not modelled.
    (1024, 57, True, False, 0, 16, 1, 25.58, 581.9), (1024, 0, True, False, 0, 16, 1, 53.30, 406.7),
    (1024, 20, True, False, 0, 16, 1, 42.10, 473.4), (1024, 57, True, True, 0, 16, 1, 14.83, 584.5),
    (512, 57, True, False, 0, 16, 1, 23.96, None), (512, 0, False, False, 0, 16, 1, 35.25, None),
    (1024, 57, True, False, 9, 16, 1, 22.48, 667.0),  # --max_vram_gib 24's choice, backward prefetch
    (1024, 57, True, True, 18, 16, 1, 9.79, 644.3),  # fixed setup (before: 11.63 GiB, the whole model)
    (1024, 57, False, False, 0, 16, 1, 25.44, 829.6), (1536, 57, False, False, 0, 16, 1, 28.03, 1814.0),
    (1024, 57, False, False, 0, 64, 1, 29.28, 842.6), (1024, 57, False, False, 0, 256, 1, 46.18, 855.2),
    (1024, 57, False, False, 0, 16, 2, 28.67, 1502.6), (1024, 57, False, False, 0, 16, 4, 33.34, 2978.2)])
def test_memory_model_reproduces_h100_measurements(res, blocks, compiled, fp8, swap, rank, batch, peak, ms) -> None:
    w = _at(res, compiled=compiled, batch=batch) if rank == 16 else \
        P.workload_for(DEV_PARAMS, (res // 16) ** 2, 512, batch, rank, compiled)
    p = P.predict(w, P.Choice(blocks, fp8, swap), H100)
    if peak:
        assert abs(p.peak_gib / peak - 1) < 0.10, p
    if ms:
        assert abs(1e3 * p.step_s / ms - 1) < 0.10, p


def test_calibration_is_chosen_by_the_device_name() -> None:
    assert P.calibration_for("NVIDIA H100 80GB HBM3")[0] is H100
    assert P.calibration_for("NVIDIA H200")[0] is P.CALIBRATIONS["H200"]
    cal, how = P.calibration_for("NVIDIA GeForce RTX 4090")
    assert cal is H100 and "RTX 4090 is not calibrated" in how
    assert "no CUDA device" in P.calibration_for(None)[1]
    # the two cards' constants give different times for the same setup (the H200 is faster)
    c = P.Choice(57, False, 0)
    assert P.predict(DEV, c, P.CALIBRATIONS["H200"]).step_s < P.predict(DEV, c, H100).step_s


def test_swap_cost_follows_the_prefetch_schedule() -> None:
    """Block swap's exposed copy time: none with an infinitely fast link, only the first block of each pass
    when every copy fits inside a block's compute, more with more blocks swapped or bf16 (twice the bytes)."""
    from dataclasses import replace

    base = P.predict(DEV, P.Choice(57, True, 0), H100).step_s
    fast = replace(H100, h2d_bytes_per_s=1e18)
    assert P.predict(DEV, P.Choice(57, True, 18), fast).step_s == pytest.approx(base)
    costs = [P.predict(DEV, P.Choice(57, True, n), H100).step_s - base for n in (2, 8, 18, 30)]
    assert all(c > 0 for c in costs) and costs == sorted(costs)
    bf16 = P.predict(DEV, P.Choice(57, False, 18), H100).step_s - P.predict(DEV, P.Choice(57, False, 0), H100).step_s
    assert bf16 > 2 * costs[2]
    # a copy shorter than one block's forward: only the first swapped block of each pass waits
    w, c = DEV, P.Choice(57, True, 4)  # 2 double + 4 single blocks
    lin_d, lin_s = w.block_linear_params
    oth_d, oth_s = w.block_other_params
    bytes_ = (lin_d + 2 * oth_d, lin_s + 2 * oth_s)
    slow_compute = 1.0  # one second per block forward: every later copy hides
    exposed = P.swap_exposed_s(w, c, slow_compute, bytes_, H100)
    assert exposed == pytest.approx((bytes_[0] + bytes_[1]) / H100.h2d_bytes_per_s)


def test_memory_model_is_monotone_and_choose_fits_the_budget() -> None:
    w = DEV
    peaks = [P.predict(w, P.Choice(k, False, 0)).peak_gib for k in range(0, 58, 8)]
    assert peaks == sorted(peaks, reverse=True)  # more checkpointing, less memory
    times = [P.predict(w, P.Choice(k, False, 0)).step_s for k in range(0, 58, 8)]
    assert times == sorted(times)  # ... and more time
    assert P.predict(w, P.Choice(57, True, 0)).peak_gib < P.predict(w, P.Choice(57, False, 0)).peak_gib - 10
    assert P.predict(w, P.Choice(57, True, 18)).peak_gib < P.predict(w, P.Choice(57, True, 0)).peak_gib - 3
    for size, best in P.fits_table(w):
        assert best is not None and best.peak_gib <= P.usable_gib(size)
        # nothing faster fits: the choice is the optimum over every candidate
        assert all(q.step_s >= best.step_s - 1e-9 for q in map(lambda c: P.predict(w, c), P.candidates(w))
                   if q.peak_gib <= P.usable_gib(size))
    assert P.choose(w, 80).choice.checkpointed_blocks < 57 and not P.choose(w, 80).choice.fp8
    assert P.choose(w, 12).choice.fp8  # bf16 weights alone are 22 GiB
    assert P.choose(w, 4) is None
    fixed = P.choose(w, 80, fp8=True, swap=4)
    assert fixed.choice.fp8 and fixed.choice.blocks_to_swap == 4
    # --fp8_matmul is kept, never chosen: every candidate carries it, with fp8 storage's memory
    assert not any(c.fp8_matmul for c in P.candidates(w))
    mm = P.candidates(w, fp8_matmul=True)
    assert mm and all(c.fp8_matmul and c.fp8 for c in mm)
    assert P.predict(w, P.Choice(57, True, 0, True)).peak_gib == P.predict(w, P.Choice(57, True, 0)).peak_gib
    assert P.choose(w, 12, fp8_matmul=True).choice.describe(57).startswith("checkpointing, fp8 matmuls")


# -- the CLI -------------------------------------------------------------------------------------------------
def _cfg(*argv: str):
    from library.train.cli import parse_args
    from library.train.config import build_config

    return build_config(parse_args(list(argv)))


@pytest.mark.parametrize("argv,match", [
    (["--max_vram_gib", "0"], "--max_vram_gib must be"), (["--max_vram_gib", "nan"], "--max_vram_gib must be"),
    (["--max_vram_gib", "24", "--cpu_offload_checkpointing"], "cannot be combined"),
    (["--gradient_checkpointing_blocks", "-1"], "must be 0 or more"),
    (["--gradient_checkpointing_blocks", "3", "--cpu_offload_checkpointing"], "cannot be combined")])
def test_bad_memory_flags_are_one_line_errors(argv, match) -> None:
    with pytest.raises(UserError, match=match):
        _cfg(*argv)


def test_dry_run_prints_the_memory_plan(tiny_ckpts, data: Path, capsys) -> None:  # noqa: F811
    import flux_train_network

    argv = ["--pretrained_model_name_or_path", str(tiny_ckpts.transformer), "--dataset_config",
            str(data / "data.toml"), "--dry_run", "--max_vram_gib", "12", "--gradient_checkpointing_blocks", "3"]
    assert flux_train_network.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory plan (predicted; 2 x (4 image + 512 text tokens)" in out
    assert "with --max_vram_gib 12: checkpointing 3/4 blocks" in out
    assert all(f"  {n} GiB card: " in out for n in (80, 48, 24, 16, 12))
    assert flux_train_network.main(argv + ["--fp8_matmul", "--mixed_precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert out.count("fp8 matmuls") == 6  # the chosen setup and all five card sizes keep it


def test_max_vram_gib_trains_with_the_chosen_setup(tiny_ckpts, data: Path, tmp_path: Path) -> None:  # noqa: F811
    out, log = tmp_path / "out", tmp_path / "train.log"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--max_vram_gib", "16",
                               "--gradient_checkpointing_blocks", "2", "--console_log_file", str(log)))
    text = log.read_text()
    assert "--max_vram_gib 16: checkpointing 2/4 blocks" in text
    rows = (out / "lora_loss.csv").read_text().splitlines()
    assert rows[0].endswith(",step_time_s") and all(float(r.split(",")[3]) > 0 for r in rows[1:])
    assert "step time: median" in text and "first step:" in text
