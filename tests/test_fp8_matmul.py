"""--fp8_matmul (library/flux/model.py, "fp8 matmuls"): per-row scaled e4m3 weights and activations, forward
matmuls through `torch._scaled_mm`, backward in bf16 with the dequantised weight.

The reference is the same arithmetic written out in float32 (quantise, dequantise, matmul): the fp8 layer must
match it to bf16 rounding, while it differs from the bf16 layer by e4m3's own rounding (a few percent). The
CPU build of torch has a row-scaled `_scaled_mm`, so these run everywhere; the GPU speed and the loss-curve
check are in BENCHMARKS.md.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.flux.compile import apply_compile
from library.flux.model import FP8_DTYPE, FP8_MAX, Fp8Linear, Fp8ScaledLinear, apply_fp8_matmul, \
    apply_fp8_storage, quantize_rows
from library.train import models as M
from tests.test_flux_compile import _assert_same, _inputs, _model_with_lora, _step
from train_helpers import data  # noqa: F401 (a fixture)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layer(seed: int = 0, n_in: int = 256, n_out: int = 512) -> tuple[nn.Linear, Fp8ScaledLinear]:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)  # FLUX-sized weights: unscaled e4m3 would put many in its subnormals
        lin.weight[3] *= 40  # rows of very different magnitude: each gets its own scale

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList([nn.ModuleDict({"lin": copy.deepcopy(lin)})])
            self.single_blocks = nn.ModuleList()

    holder = Holder()
    assert apply_fp8_matmul(holder) == ["double_blocks.0.lin"]
    return lin, holder.double_blocks[0]["lin"]


def _count_scaled_mm(monkeypatch) -> list[tuple[int, ...]]:
    """The first operand's shape of every `torch._scaled_mm` call from now on (the model looks it up per call)."""
    calls, real = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(tuple(a[0].shape)) or real(*a, **k))
    return calls


def test_quantize_rows_uses_each_rows_range() -> None:
    x = torch.randn(8, 64) * torch.logspace(-4, 2, 8)[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and s.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))  # every row spans e4m3
    err = (q.float() * s - x).abs()
    assert (err <= x.abs() * 2 ** -4 + s * 2 ** -9).all()  # e4m3: 3 mantissa bits (and its subnormal step)


def test_fp8_layer_matches_the_written_out_arithmetic_and_is_close_to_bf16(monkeypatch) -> None:
    lin, f8 = _layer()
    assert isinstance(f8, Fp8ScaledLinear) and f8.weight.dtype == FP8_DTYPE and not f8.weight.requires_grad
    assert "weight_scale" not in f8.state_dict()  # the checkpoint keys stay kohya's / BFL's
    x = torch.randn(3, 100, 256, dtype=torch.bfloat16, requires_grad=True)
    calls = _count_scaled_mm(monkeypatch)
    with torch.autocast("cpu", torch.bfloat16):
        y = f8(x)
    monkeypatch.undo()
    assert calls == [(300, 256)] and y.dtype == torch.bfloat16
    xq, xs = quantize_rows(x.detach().reshape(-1, 256))
    w = f8.weight.float() * f8.weight_scale[:, None]
    ref = ((xq.float() * xs) @ w.t() + lin.bias.float()).reshape(3, 100, 512)
    assert _rel(y, ref) < 8e-3  # bf16 output rounding only
    with torch.autocast("cpu", torch.bfloat16):
        y_bf16 = lin(x)
    assert 5e-3 < _rel(y, y_bf16) < 0.06  # e4m3 rounding of x and W: visible, and bounded
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert _rel(gx, grad.float() @ w) < 8e-3  # backward: bf16 matmul with the dequantised weight


def test_few_rows_use_the_dequantised_weight(monkeypatch) -> None:
    """The modulation Linears see one row per sample: no fp8 matmul there, the same result as the written out
    dequantised matmul."""
    lin, f8 = _layer()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    calls = _count_scaled_mm(monkeypatch)
    with torch.autocast("cpu", torch.bfloat16):
        y = f8(x)
    assert calls == []
    w = (f8.weight.float() * f8.weight_scale[:, None]).to(torch.bfloat16)
    assert torch.equal(y, nn.functional.linear(x, w, lin.bias))


def test_scaled_storage_is_closer_to_bf16_than_kohyas_unscaled_fp8() -> None:
    """Per-row scales keep e4m3's relative error (~2.6%) for weights of any size; the unscaled cast loses
    precision below e4m3's smallest normal (2^-6): 11% error at std 0.005, 5.6% at 0.01, 2.7% at 0.05."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.005)
    _, f8 = _layer()
    f8.weight.data, f8.weight_scale = quantize_rows(lin.weight.data)
    unscaled = copy.deepcopy(lin)
    holder = nn.Module()
    holder.double_blocks, holder.single_blocks = nn.ModuleList([nn.ModuleDict({"l": unscaled})]), nn.ModuleList()
    apply_fp8_storage(holder, torch.bfloat16)
    w_unscaled = holder.double_blocks[0]["l"].weight.float()
    w_scaled = f8.weight.float() * f8.weight_scale
    assert _rel(w_scaled, lin.weight) < 0.5 * _rel(w_unscaled, lin.weight)


def test_flux_with_fp8_matmul_trains_compiled_and_checkpointed_like_eager() -> None:
    """Tiny FLUX with LoRA: fp8 matmuls compiled inside the checkpointed block graphs give the eager fp8 loss and
    gradients; the LoRA gradients stay within a few percent of the bf16 model's."""
    torch._dynamo.reset()
    model, params = _model_with_lora()
    bf16, bf16_params = _model_with_lora()  # the same seeded weights and LoRA, left in bf16
    names = apply_fp8_matmul(model)
    assert len(names) == sum(isinstance(m, Fp8ScaledLinear) for m in model.modules()) > 0
    model.enable_gradient_checkpointing()
    inp = _inputs(model.params, h=8, w=8, s=8)
    with torch.autocast("cpu", torch.bfloat16):
        eager = _step(model, params, inp)
        apply_compile(model, backend="aot_eager", fullgraph=True)
        compiled = _step(model, params, inp)
        reference = _step(bf16, bf16_params, inp)
    _assert_same(eager, compiled, 1e-3)  # the same arithmetic (autocast is off inside the fp8 function)
    _assert_same(reference, eager, 0.1)


def test_fp8_matmul_refuses_unscaled_fp8_weights() -> None:
    model, _ = _model_with_lora()
    model.double_blocks[0].img_attn.qkv.linear.__class__ = Fp8Linear
    with pytest.raises(UserError, match="load the transformer in bf16"):
        apply_fp8_matmul(model)


def test_a_device_without_fp8_matmuls_is_a_one_line_error(monkeypatch) -> None:
    def missing(*a, **k):
        raise RuntimeError("_scaled_mm is only supported on CUDA devices with compute capability >= 9.0\nmore")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    with pytest.raises(UserError, match=r"--fp8_matmul: this device, cpu, has no row-scaled fp8 matmul "
                                        r"\(_scaled_mm is only supported .*\); it needs compute capability 8.9"):
        M.check_fp8_matmul(torch.device("cpu"))


def test_trainer_with_fp8_matmul(tiny_ckpts, data, tmp_path, monkeypatch) -> None:  # noqa: F811
    """flux_train_network.py --fp8_matmul end to end: the block Linears are quantised, the fp8 matmuls run in
    the training steps (64 T5 tokens: the text stream and the single blocks have >= 64 rows), the LoRA is saved and the losses are finite."""
    from safetensors.torch import load_file

    from train_helpers import base_args, train_in_process

    calls = _count_scaled_mm(monkeypatch)
    out, log = tmp_path / "out", tmp_path / "train.log"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--fp8_matmul", "--t5xxl_max_token_length", "64",
                               "--mixed_precision", "bf16", "--gradient_checkpointing", "--console_log_file",
                               str(log)))
    assert "--fp8_matmul: 26 block Linears quantised to e4m3 with per-row scales" in log.read_text()
    assert len(calls) > 1 and all(shape[0] >= 64 for shape in calls[1:])  # calls[0]: the start-up probe
    rows = (out / "lora_loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(r.split(",")[1]))) for r in rows)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in load_file(out / "lora.safetensors"))
