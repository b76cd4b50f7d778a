"""Regional compilation (library.flux.compile): compiled blocks compute what eager blocks compute, with LoRA
injected, gradient checkpointing and block swap, in two graphs that every block of a type shares.

The CPU inductor backend compiles C++ with gcc (tens of seconds per graph on a 2-core CI box), so most
tests here use "aot_eager": the same dynamo capture and AOT-autograd forward/backward split that inductor
gets, without code generation. One test runs real inductor on the smallest input; it takes ~90 s, so it
runs only with FLUX_TEST_INDUCTOR=1 (run it after changing the blocks or this module).
"""

from __future__ import annotations

import os

import pytest
import torch

from library.flux.compile import apply_compile, compiled_blocks, remove_compile
from library.flux.math import make_img_ids, make_txt_ids
from library.flux.model import Flux
from library.flux.tiny import tiny_flux_params
from networks import lora_flux


def _model_with_lora(seed: int = 0) -> tuple[Flux, list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    model = Flux(tiny_flux_params())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.requires_grad_(False)
    network = lora_flux.create_network(1.0, 4, 4, model, None, None)
    network.apply_to()
    for adapter in network.adapters():  # a non-zero up so the LoRA changes the output and both grads flow
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.05)
    return model, list(network.parameters())


def _inputs(p, h: int = 4, w: int = 3, s: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(img=torch.randn(1, h * w, p.in_channels, generator=g), img_ids=make_img_ids(1, h, w),
                txt=torch.randn(1, s, p.context_in_dim, generator=g), txt_ids=make_txt_ids(1, s),
                timesteps=torch.tensor([0.4]), y=torch.randn(1, p.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5]))


def _step(model: Flux, params: list[torch.nn.Parameter], inp: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    out = model(**inp)
    (out.float() ** 2).mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _assert_same(a, b, rtol: float) -> None:
    out_a, grads_a = a
    out_b, grads_b = b
    assert ((out_a - out_b).norm() / out_a.norm()).item() < rtol
    assert len(grads_a) == len(grads_b) > 0
    num = sum(((ga - gb) ** 2).sum() for ga, gb in zip(grads_a, grads_b)).sqrt()
    den = sum((ga ** 2).sum() for ga in grads_a).sqrt()
    assert den > 0 and (num / den).item() < rtol


@pytest.mark.parametrize("checkpointing,swap", [(False, False), (True, True)])
def test_compiled_equals_eager_with_lora(checkpointing, swap):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, params = _model_with_lora()
    if swap:
        model.enable_block_swap(2, "cpu")
    if checkpointing:
        model.enable_gradient_checkpointing()
    inp = _inputs(model.params)
    eager = _step(model, params, inp)
    keys = list(model.state_dict())
    assert apply_compile(model, backend="aot_eager", fullgraph=True) == 4
    compiled = _step(model, params, inp)
    _assert_same(eager, compiled, 1e-5)
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: LoRA / checkpoint names unchanged
    if swap:
        assert not model.block_swap.resident  # the hooks still ran around the compiled forwards
    # One graph per block type, shared by every block of that type (fullgraph: no graph breaks), plus one
    # for the first double block, whose inputs do not require grad yet (the base is frozen).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def _saved_bytes(model: Flux, inp: dict) -> int:
    """Bytes of the activations autograd keeps for backward during one forward (parameters not counted)."""
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inp)
    (out.float() ** 2).mean().backward()
    return total[0]


@pytest.mark.parametrize("in_graph", [True, False])
def test_checkpoint_inside_the_compiled_graph(in_graph):
    """Checkpointed compiled blocks recompute inside their backward graph: the forward runs once per step
    (an eager checkpoint around the compiled call runs it twice: forward and recompute), the activations
    kept are those of an eager checkpoint, and the gradients are the eager ones."""
    torch._dynamo.reset()
    model, params = _model_with_lora()
    inp = _inputs(model.params, h=8, w=8, s=8)
    plain_bytes = _saved_bytes(model, inp)
    model.enable_gradient_checkpointing()
    eager = _step(model, params, inp)
    eager_bytes = _saved_bytes(model, inp)
    apply_compile(model, backend="aot_eager", fullgraph=True, checkpoint_in_graph=in_graph)
    calls = []
    for block in [*model.double_blocks, *model.single_blocks]:
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    compiled = _step(model, params, inp)
    _assert_same(eager, compiled, 1e-5)
    n_blocks = len(model.double_blocks) + len(model.single_blocks)
    assert len(calls) == n_blocks * (1 if in_graph else 2)
    compiled_bytes = _saved_bytes(model, inp)
    assert eager_bytes < plain_bytes / 10  # the tiny model at 64 image tokens: checkpointing keeps ~2%
    assert compiled_bytes < 1.1 * eager_bytes


def test_lora_attribute_change_recompiles_not_stale():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, params = _model_with_lora()
    inp = _inputs(model.params)
    apply_compile(model, backend="aot_eager")
    with_lora = model(**inp).detach()
    for block in [*model.double_blocks, *model.single_blocks]:
        for m in block.modules():
            if hasattr(m, "lora") and hasattr(m.lora, "multiplier"):
                m.lora.multiplier = 0.0
    remove_compile(model)
    assert compiled_blocks(model) == []
    base = model(**inp).detach()  # eager, LoRA off
    apply_compile(model, backend="aot_eager")
    assert torch.allclose(model(**inp), base, atol=1e-6)  # guards saw the multiplier change
    assert not torch.allclose(base, with_lora, atol=1e-4)


def test_failing_compiler_falls_back_to_eager_with_one_warning(caplog):
    """A backend that cannot compile (a missing C compiler, say) costs one warning line, not the run."""
    torch._dynamo.reset()
    model, params = _model_with_lora()
    model.enable_gradient_checkpointing()
    inp = _inputs(model.params)
    eager = _step(model, params, inp)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    apply_compile(model, backend=broken_backend)
    with caplog.at_level("WARNING", logger="library.flux.compile"):
        fallback = _step(model, params, inp)
        again = _step(model, params, inp)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    _assert_same(eager, fallback, 1e-6)
    _assert_same(eager, again, 1e-6)
    torch._dynamo.reset()


@pytest.mark.skipif(not os.environ.get("FLUX_TEST_INDUCTOR"), reason="~90 s of C++ compilation on a CPU box; "
                    "set FLUX_TEST_INDUCTOR=1 to run it")
def test_inductor_matches_eager():
    """Real code generation (C++ on the CPU): the fused kernels compute the same numbers."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, params = _model_with_lora()
    model.enable_gradient_checkpointing()
    inp = _inputs(model.params, h=2, w=2, s=3)
    eager = _step(model, params, inp)
    apply_compile(model, backend="inductor")
    _assert_same(eager, _step(model, params, inp), 1e-4)
