"""The FLUX transformer against diffusers' FluxTransformer2DModel on the same tiny weights, plus its options."""

from __future__ import annotations

import pytest
import torch

from library.flux.convert import transformer_bfl_to_diffusers, transformer_diffusers_to_bfl
from library.flux.loading import load_transformer
from library.flux.math import make_img_ids, make_txt_ids
from library.flux.model import Fp8Linear, FluxParams
from library.flux.safetensors_io import open_checkpoint

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_inputs(p: FluxParams, batch: int = 2, h: int = 3, w: int = 5, s: int = 7, seed: int = 0) -> dict:
    """Random inputs for a non-square packed grid h x w (latent 2h x 2w) and s text tokens."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, h * w, p.in_channels, generator=gen), img_ids=make_img_ids(batch, h, w),
        txt=torch.randn(batch, s, p.context_in_dim, generator=gen), txt_ids=make_txt_ids(batch, s),
        timesteps=torch.tensor([0.3, 0.8][:batch]), y=torch.randn(batch, p.vec_in_dim, generator=gen),
        guidance=torch.tensor([3.5, 5.0][:batch]) if p.guidance_embed else None)


def diffusers_forward(model, inp: dict, cond=None, cond_ids=None, mask=None) -> torch.Tensor:
    img, img_ids = inp["img"], inp["img_ids"]
    if cond is not None:  # diffusers has no Kontext argument: it is given the concatenated sequence
        img, img_ids = torch.cat([img, cond], 1), torch.cat([img_ids, cond_ids], 1)
    kwargs = {}
    if mask is not None:
        full = torch.cat([mask, torch.ones(mask.shape[0], img.shape[1], dtype=torch.bool)], 1)
        kwargs["joint_attention_kwargs"] = {"attention_mask": full[:, None, None, :]}
    out = model(hidden_states=img, encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                timestep=inp["timesteps"], img_ids=img_ids[0], txt_ids=inp["txt_ids"][0],
                guidance=inp["guidance"], return_dict=False, **kwargs)[0]
    return out[:, : inp["img"].shape[1]]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def pair(request, tiny_ckpts, tiny_ckpts_schnell):
    """(ours loaded from the BFL file, ours loaded from the diffusers folder, diffusers' model)."""
    from diffusers import FluxTransformer2DModel

    ckpts = tiny_ckpts if request.param == "dev" else tiny_ckpts_schnell
    ours = load_transformer(ckpts.transformer, "cpu", torch.float32)
    ours_from_diffusers = load_transformer(ckpts.diffusers, "cpu", torch.float32)
    theirs = FluxTransformer2DModel.from_pretrained(ckpts.diffusers, subfolder="transformer",
                                                    torch_dtype=torch.float32)
    return ours.eval(), ours_from_diffusers.eval(), theirs.eval()


@torch.no_grad()
def test_matches_diffusers(pair):
    ours, ours_dif, theirs = pair
    inp = make_inputs(ours.params)
    ref = diffusers_forward(theirs, inp)
    assert ref.std() > 0.1  # the tiny model's output is not degenerate
    assert rel_err(ours(**inp), ref) <= TOL
    assert rel_err(ours_dif(**inp), ref) <= TOL


@torch.no_grad()
def test_matches_diffusers_with_kontext_cond_and_text_mask(pair):
    ours, _, theirs = pair
    p = ours.params
    inp = make_inputs(p, h=2, w=4)
    cond = torch.randn(2, 6, p.in_channels, generator=torch.Generator().manual_seed(5))
    cond_ids = make_img_ids(2, 2, 3, index=1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 5:] = False
    out = ours(**inp, cond=cond, cond_ids=cond_ids, txt_mask=mask)
    assert out.shape == inp["img"].shape
    assert rel_err(out, diffusers_forward(theirs, inp, cond, cond_ids, mask)) <= TOL
    # Each of them really changes the result (so the comparison above can fail).
    assert rel_err(ours(**inp, cond=cond, cond_ids=cond_ids), out) > 1e-3
    assert rel_err(ours(**inp, txt_mask=mask), out) > 1e-3
    # Masked-out text tokens have no influence at all.
    txt2 = inp["txt"].clone()
    txt2[0, 3:] += 10.0
    assert torch.allclose(ours(**{**inp, "txt": txt2}, cond=cond, cond_ids=cond_ids, txt_mask=mask)[0], out[0],
                          atol=1e-5)


@torch.no_grad()
def test_output_depends_on_every_input(pair):
    ours, _, _ = pair
    inp = make_inputs(ours.params)
    base = ours(**inp)
    # (Permuting the text tokens would change nothing: text ids are all zero, so text has no position.)
    changes = {"img": inp["img"] + 0.5, "txt": inp["txt"] + 0.5 * torch.randn_like(inp["txt"]), "y": -inp["y"],
               "timesteps": inp["timesteps"] + 0.05}
    if ours.params.guidance_embed:
        changes["guidance"] = inp["guidance"] + 0.5
    for name, value in changes.items():
        assert rel_err(ours(**{**inp, name: value}), base) > 1e-2, name


def test_bfl_diffusers_round_trip_is_exact(tiny_ckpts):
    with open_checkpoint(tiny_ckpts.transformer) as ckpt:
        sd = ckpt.state_dict()
    back = transformer_diffusers_to_bfl(transformer_bfl_to_diffusers(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    dif = transformer_bfl_to_diffusers(sd)
    assert "norm_out.linear.weight" in dif and "single_transformer_blocks.1.proj_mlp.weight" in dif
    assert not torch.equal(dif["norm_out.linear.weight"], sd["final_layer.adaLN_modulation.1.weight"])


def test_params_read_from_shapes(tiny_ckpts, tiny_ckpts_schnell):
    with open_checkpoint(tiny_ckpts.transformer) as ckpt:
        p = FluxParams.from_shapes(ckpt.shapes)
    assert (p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks, p.mlp_ratio) == (256, 2, 2, 2, 4.0)
    assert p.guidance_embed and p.qkv_bias and p.in_channels == 64
    with open_checkpoint(tiny_ckpts_schnell.transformer) as ckpt:
        assert not FluxParams.from_shapes(ckpt.shapes).guidance_embed


def _loss_and_grads(model, inp):
    model.zero_grad()
    img = inp["img"].clone().requires_grad_(True)
    out = model(**{**inp, "img": img})
    (out ** 2).mean().backward()
    return out.detach(), img.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_gradient_checkpointing_same_outputs_and_grads(tiny_ckpts, cpu_offload):
    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    inp = make_inputs(model.params)
    out0, gimg0, grads0 = _loss_and_grads(model, inp)
    model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
    out1, gimg1, grads1 = _loss_and_grads(model, inp)
    assert torch.allclose(out0, out1, atol=1e-6)
    assert torch.allclose(gimg0, gimg1, atol=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(model.parameters()))
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-4, atol=1e-6), name


@torch.no_grad()
def test_fp8_storage_runs_and_is_close(tiny_ckpts):
    ref = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    fp8 = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32, fp8=True)
    qkv = fp8.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and isinstance(qkv, torch.nn.Linear)
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.bias.dtype == torch.float32
    assert fp8.single_blocks[1].linear2.weight.dtype == torch.float8_e4m3fn
    assert fp8.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    assert fp8.img_in.weight.dtype == torch.float32 and fp8.final_layer.linear.weight.dtype == torch.float32
    inp = make_inputs(ref.params)
    err = rel_err(fp8(**inp), ref(**inp))
    assert 1e-4 < err < 0.15  # quantised (not a silent no-op) but close


def test_attn_backend_selection(tiny_ckpts):
    from library.errors import UserError

    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    with pytest.raises(UserError, match="backend 'flash'"):
        model.set_attn_backend("flash")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers is not installed"):
            model.set_attn_backend("xformers")
    model.set_attn_backend("sdpa")


def test_block_swap_bookkeeping_and_equality(tiny_ckpts):
    from library.errors import UserError

    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    model.requires_grad_(False)  # a frozen base, as under LoRA; one trainable weight inside a swapped block
    trainable = model.single_blocks[1].linear2.weight
    trainable.requires_grad_(True)
    inp = make_inputs(model.params)
    with torch.no_grad():
        ref = model(**inp)
    out0, gimg0, grads0 = _loss_and_grads(model, inp)
    with pytest.raises(UserError, match="blocks_to_swap 4: this model has 2 double and 2 single blocks"):
        model.enable_block_swap(4, "cpu")
    model.enable_block_swap(2, "cpu")  # 1 double + 2 single blocks
    swap = model.block_swap
    assert swap.names == ["double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert "linear2.weight" not in swap.host[2] and "linear2.bias" in swap.host[2]
    swap.record = True
    with torch.no_grad():
        assert torch.equal(model(**inp), ref)
    assert swap.moves == [("in", "double_blocks.1"), ("out", "double_blocks.1"), ("in", "single_blocks.0"),
                          ("out", "single_blocks.0"), ("in", "single_blocks.1"), ("out", "single_blocks.1")]
    assert not swap.resident
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        swap.moves.clear()
        out1, gimg1, grads1 = _loss_and_grads(model, inp)
        assert torch.allclose(out0, out1, atol=1e-6) and torch.allclose(gimg0, gimg1, atol=1e-6)
        assert list(grads1) == ["single_blocks.1.linear2.weight"]
        assert torch.allclose(grads0["single_blocks.1.linear2.weight"], grads1["single_blocks.1.linear2.weight"],
                              rtol=1e-4, atol=1e-6)
        # Forward: each swapped block in and out once; backward: in again before its gradients, in
        # reverse order, and out once they are computed. Nothing stays resident.
        assert swap.moves[:6] == [(k, b) for b in swap.names for k in ("in", "out")]
        assert swap.moves[6:] == [(k, b) for b in reversed(swap.names) for k in ("in", "out")], checkpointing
        assert not swap.resident


def _most_resident(moves: list[tuple[str, str]]) -> int:
    resident, most = set(), 0
    for kind, name in moves:
        resident.add(name) if kind == "in" else resident.discard(name)
        most = max(most, len(resident))
    return most


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_prefetches_the_next_block_in_forward_and_backward(tiny_ckpts, checkpointing):
    """The CUDA schedule (prefetch=True), run on the CPU: block i+1 comes in when block i starts its forward,
    block i-1 when block i starts its backward; never more than two swapped blocks resident; same gradients."""
    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    model.requires_grad_(False)
    model.single_blocks[1].linear2.weight.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    inp = make_inputs(model.params)
    out0, gimg0, grads0 = _loss_and_grads(model, inp)
    model.enable_block_swap(2, "cpu", prefetch=True)
    swap = model.block_swap
    swap.record = True
    d1, s0, s1 = swap.names
    out1, gimg1, grads1 = _loss_and_grads(model, inp)
    assert torch.equal(out0, out1) and torch.equal(gimg0, gimg1)
    assert grads1.keys() == grads0.keys() and all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    forward = [("in", d1), ("in", s0), ("out", d1), ("in", s1), ("out", s0), ("out", s1)]
    backward = [("in", s1), ("in", s0), ("out", s1), ("in", d1), ("out", s0), ("out", d1)]
    assert swap.moves == forward + backward
    assert _most_resident(swap.moves) == 2 and not swap.resident
    swap.moves.clear()
    with torch.no_grad():
        model(**inp)
    assert swap.moves == forward and not swap.resident  # inference: the forward schedule only
    # Negative control: without prefetch every block waits for its own copy (in, out, in, out, ...).
    model.enable_block_swap(2, "cpu", prefetch=False)
    model.block_swap.record = True
    _loss_and_grads(model, inp)
    assert model.block_swap.moves != forward + backward and _most_resident(model.block_swap.moves) == 1


def test_block_swap_never_puts_the_swapped_weights_on_the_device(tiny_ckpts):
    """The swapped blocks' frozen weights go from the loaded model straight to (pinned) host copies; the rest
    goes to the device tensor by tensor. ("meta" stands in for the GPU: a tensor that went there once could
    not come back, so moving the whole model first and copying back would fail here.)"""
    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    model.requires_grad_(False)
    trainable = model.single_blocks[1].linear2.weight
    trainable.requires_grad_(True)
    model.enable_block_swap(2, "meta")
    swap = model.block_swap
    swapped = {f"{block}.{name}" for block, host in zip(swap.names, swap.host) for name in host}
    assert swapped and "single_blocks.1.linear2.weight" not in swapped
    for name, p in model.named_parameters():
        assert p.device.type == ("cpu" if name in swapped else "meta"), name
    assert all(b.device.type == "meta" for b in model.buffers())


@pytest.mark.parametrize("checkpointing,compiled", [(False, False), (True, False), (False, True), (True, True)])
def test_block_swap_frees_each_device_copy_after_the_blocks_forward(checkpointing, compiled):
    """A matmul saves a view of its weight (`weight.t()`): kept as such, it would hold a swapped block's device
    copy until backward, and block swap would save no memory without checkpointing. The swap's saved-tensor
    hook keeps such views as recipes on the parameter: every evicted block's copy is freed right after its
    forward, and the gradients are those of the unswapped model."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from library.flux.compile import apply_compile
    from tests.test_flux_compile import _inputs, _model_with_lora, _step

    torch._dynamo.reset()
    model, params = _model_with_lora()
    if checkpointing:
        model.enable_gradient_checkpointing()
    inp = _inputs(model.params, h=4, w=4, s=4)
    reference = _step(model, params, inp)
    model.enable_block_swap(2, "cpu", prefetch=False)
    if compiled:
        apply_compile(model, backend="aot_eager_decomp_partition", fullgraph=True)  # inductor's partitioner
    swap, copies = model.block_swap, []
    bring_in = swap.bring_in

    def recording(i, wait=True):
        bring_in(i, wait)
        copies.extend(StorageWeakRef(p.untyped_storage()) for n, p in swap.blocks[i].named_parameters()
                      if n in swap.host[i])

    swap.bring_in = recording
    out = model(**inp)
    assert copies and all(ref.expired() for ref in copies)  # nothing holds a swapped weight's device copy
    (out.float() ** 2).mean().backward()
    swap.bring_in = bring_in
    for p in params:
        p.grad = None
    swapped = _step(model, params, inp)
    assert torch.equal(reference[0], swapped[0]) or compiled
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(reference[1], swapped[1]))
