"""The FLUX.1 transformer (dev and schnell) with the Black Forest Labs parameter names.

Sizes live in `FluxParams`, read from a checkpoint's tensor shapes (`FluxParams.from_shapes`), so the real
12B model and the tiny test checkpoints go through the same code. What FLUX fixes (head dim, RoPE axes)
are the named constants of `library.flux.math`.

Memory options, applied after loading: `enable_gradient_checkpointing` (per block, optionally only the
first N blocks, or keeping the activations between blocks in host memory), `apply_fp8_storage` (Linear weights of the blocks stored as
float8 e4m3 and upcast per forward) and `enable_block_swap` (blocks' weights kept in host memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.errors import UserError
from library.flux.compile import checkpointed_call
from library.flux.layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock
from library.flux.math import ATTN_BACKENDS, AXES_DIM, HEAD_DIM, THETA, import_xformers, key_padding_mask, \
    timestep_embedding

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep / guidance embedding fed to time_in / guidance_in


@dataclass(frozen=True)
class FluxParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    qkv_bias: bool
    guidance_embed: bool
    axes_dim: tuple[int, ...] = AXES_DIM
    theta: int = THETA

    @staticmethod
    def from_shapes(shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> "FluxParams":
        """Read the architecture from BFL-named tensor shapes (a state dict's or a safetensors header's)."""
        need = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"]
        missing = [k for k in need if k not in shapes]
        if missing:
            raise UserError(f"{name}: not a FLUX transformer: missing {', '.join(missing)}")
        hidden, in_channels = shapes["img_in.weight"]
        if hidden % HEAD_DIM:
            raise UserError(f"{name}: img_in.weight: hidden size {hidden} is not a multiple of {HEAD_DIM}")
        depth = _count_blocks(shapes, r"double_blocks\.(\d+)\.")
        single = _count_blocks(shapes, r"single_blocks\.(\d+)\.")
        if depth:
            mlp_hidden = shapes.get("double_blocks.0.img_mlp.0.weight", (4 * hidden,))[0]
        else:
            mlp_hidden = shapes.get("single_blocks.0.linear1.weight", (7 * hidden,))[0] - 3 * hidden
        return FluxParams(
            in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1], context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=hidden // HEAD_DIM,
            depth=depth, depth_single_blocks=single,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes or "single_blocks.0.linear1.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes)


def _count_blocks(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _to(tensors: tuple, device: torch.device | str) -> tuple:
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in tensors)


class Flux(nn.Module):
    """FLUX.1 flow transformer. Inputs and output are packed latent tokens (see `math.pack_latents`)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        h = params.hidden_size
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = h
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(params.axes_dim, params.theta)
        self.img_in = nn.Linear(params.in_channels, h, bias=True)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, h)
        self.vector_in = MLPEmbedder(params.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, h) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(h, params.out_channels)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.checkpointed_blocks = 0  # how many blocks (in forward order) are recomputed in backward
        self.block_swap = None  # a BlockSwap when enable_block_swap was called

    # -- options -------------------------------------------------------------------------------------------
    def set_attn_backend(self, backend: str) -> None:
        """"sdpa" (torch scaled_dot_product_attention) or "xformers" (UserError if not installed)."""
        if backend not in ATTN_BACKENDS:
            raise UserError(f"attention backend {backend!r}: expected one of {', '.join(ATTN_BACKENDS)}")
        if backend == "xformers":
            import_xformers()
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attn_backend = backend

    @property
    def n_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    def enable_gradient_checkpointing(self, cpu_offload: bool = False, blocks: int | None = None) -> None:
        """Recompute blocks in backward; with `cpu_offload`, block inputs are kept in host memory.

        `blocks` (selective checkpointing): recompute only the first `blocks` blocks in forward order (double
        blocks first, then single blocks) and keep the activations of the others: each block not recomputed
        saves one block forward per step and costs its activations (library/train/memory_plan.py)."""
        if cpu_offload and self.block_swap is not None:
            raise UserError("--cpu_offload_checkpointing cannot be combined with --blocks_to_swap (as in kohya)")
        n = self.n_blocks
        if blocks is not None and not 0 <= blocks <= n:
            raise UserError(f"gradient_checkpointing_blocks {blocks}: this model has {n} blocks; use 0..{n}")
        if cpu_offload and blocks is not None and blocks != n:
            raise UserError("--cpu_offload_checkpointing needs every block checkpointed; "
                            "drop --gradient_checkpointing_blocks")
        self.gradient_checkpointing = True
        self.cpu_offload_checkpointing = cpu_offload
        self.checkpointed_blocks = n if blocks is None else blocks

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.checkpointed_blocks = 0

    def enable_block_swap(self, n: int, device: torch.device | str, prefetch: bool | None = None) -> None:
        """Keep `n` blocks' weights in host memory and bring each to `device` just for its use (kohya
        --blocks_to_swap): n//2 double blocks and 2*(n - n//2) single blocks, the last ones of each list.

        Moves the rest of the model to `device`. Call it after freezing the base weights (and injecting
        LoRA): only parameters with requires_grad=False are swapped, trainable ones stay on `device`.
        The swapped weights are treated as read-only (their host copy is the master). `prefetch` (default:
        on CUDA) copies the next swapped block in while the current one computes, in forward and backward."""
        if self.cpu_offload_checkpointing:
            raise UserError("--blocks_to_swap cannot be combined with --cpu_offload_checkpointing (as in kohya)")
        if self.block_swap is not None:
            self.block_swap.remove()
        self.block_swap = BlockSwap(self, n, torch.device(device), prefetch)

    # -- forward -------------------------------------------------------------------------------------------
    def _run(self, index: int, block: nn.Module, *args):
        if not (self.gradient_checkpointing and index < self.checkpointed_blocks and torch.is_grad_enabled()):
            return block(*args)
        if not self.cpu_offload_checkpointing:
            return checkpointed_call(block, *args)  # inside the compiled graphs when compiled
        # The tensors passed between blocks (the only ones a checkpoint keeps) live on the CPU.
        device = args[-2].device  # pe stays on the compute device

        def offloaded(*a):
            out = block(*_to(a, device))
            return _to(out if isinstance(out, tuple) else (out,), "cpu")

        out = checkpoint(offloaded, *args, use_reentrant=False)
        return out if len(out) > 1 else out[0]

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, cond_ids: torch.Tensor | None = None,
                txt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity for `img` [B, L, in_channels]; returns [B, L, out_channels].

        `timesteps` [B] in [0, 1]; `guidance` [B] (dev only); `cond`/`cond_ids` extra image tokens
        (Kontext) appended to the image sequence; `txt_mask` [B, S] True for real T5 tokens.
        """
        n_img = img.shape[1]
        if cond is not None:
            img = torch.cat((img, cond), dim=1)
            img_ids = torch.cat((img_ids, cond_ids), dim=1)
        img = self.img_in(img)
        # Embeddings follow the activations' dtype, so float32 timesteps / guidance work with a bf16 model.
        vec = self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model has a guidance embedding (dev): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = None if txt_mask is None else key_padding_mask(txt_mask.to(img.device), img.shape[1])
        if self.gradient_checkpointing and self.cpu_offload_checkpointing and torch.is_grad_enabled():
            img, txt = img.cpu(), txt.cpu()

        if self.block_swap is not None:
            self.block_swap.evict_all()  # blocks a forward without backward left on the device
        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(i, block, img, txt, vec, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks, start=len(self.double_blocks)):
            x = self._run(i, block, x, vec, pe, mask)
        x = x.to(vec.device)[:, txt.shape[1]: txt.shape[1] + n_img]
        return self.final_layer(x, vec)


# -- fp8 storage -------------------------------------------------------------------------------------------
# Design note: kohya's --fp8_base stores the transformer's weights as float8 e4m3 (half of bf16's memory)
# and relies on autocast to upcast them inside each matmul. Here the upcast is explicit: the block Linears
# become `Fp8Linear`, an nn.Linear subclass (so LoRA still recognises and wraps it) whose weight is e4m3
# and is cast to the input's dtype per forward. Norm scales, biases, embedders and the final layer stay in
# the compute dtype, as kohya keeps them. No per-tensor scaling: values beyond ±448 saturate.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Linear(nn.Linear):
    """nn.Linear with a float8_e4m3fn weight, upcast to the input's dtype for each matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    """Saturating cast to e4m3 (a plain cast would turn out-of-range values into NaN)."""
    if t.dtype == FP8_DTYPE or t.device.type == "meta":
        return t.to(FP8_DTYPE)
    if t.element_size() == 1:  # another fp8 flavour (e5m2 files): clamp needs a wider dtype
        t = t.to(torch.bfloat16)
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def apply_fp8_storage(model: Flux, compute_dtype: torch.dtype) -> list[str]:
    """Cast `model` to `compute_dtype`, then store every block Linear's weight as e4m3 (`Fp8Linear`).

    Works on a meta-device model too (the loader then fills in e4m3 tensors). Returns the names converted.
    """
    model.to(compute_dtype)
    converted = []
    for prefix, blocks in (("double_blocks", model.double_blocks), ("single_blocks", model.single_blocks)):
        for name, module in blocks.named_modules():
            if type(module) is nn.Linear:
                # Re-class in place: the module object, its bias and any references to it stay valid.
                module.__class__ = Fp8Linear
                module.weight = nn.Parameter(to_fp8(module.weight.data), requires_grad=False)
                converted.append(f"{prefix}.{name}")
    return converted


# -- fp8 matmuls -------------------------------------------------------------------------------------------
# Design note (--fp8_matmul, our extension; the "fp8 matmuls for the frozen base"). Where --fp8_base
# only stores e4m3 and upcasts the weight for a bf16 matmul, this runs the forward matmuls themselves in fp8
# on the tensor cores (`torch._scaled_mm`, nominally twice the bf16 rate on Hopper / Ada):
# - weights are quantised once, per output row: W ≈ q · s with q e4m3 and s = max|W_row| / 448 (float32), so
#   every row uses the whole e4m3 range (kohya's unscaled cast puts FLUX's small weights near e4m3's subnormals);
# - activations are quantised per row (token) at each call, s_x = max|x_row| / 448, fused by inductor with
#   the op that produced x;
# - the backward (the input gradient; the base gets none) stays in bf16 with the dequantised weight: an fp8
#   backward would need a second, transposed copy of every weight and e5m2 gradients;
# - inputs with few rows (the modulation Linears see one vector per sample) and widths not a multiple of 16
#   use the dequantised weight in a bf16 matmul: fp8 cannot pay there.
# The LoRA branch stays in its own dtype. BENCHMARKS.md (issue 11 part e) has one layer's measured speed (not
# faster alone); the trainer's step and the 50-step loss-curve check are still to be measured: experimental.
FP8_MATMUL_MIN_ROWS = 64


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with x ≈ q · scale, each row scaled to e4m3's range."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class _Fp8Matmul(torch.autograd.Function):
    """x @ (q · s)ᵀ in fp8 (x quantised per row); backward: the input gradient in the output's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):  # explicit dtypes; compiled = eager under autocast
            xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
            y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=out_dtype)
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        w = (weight.float() * scale.view(-1, 1)).to(grad.dtype)
        gx = grad.reshape(-1, grad.shape[-1]) @ w
        return gx.reshape(*grad.shape[:-1], weight.shape[1]).to(ctx.x_dtype), None, None, None


class Fp8ScaledLinear(nn.Linear):
    """A frozen nn.Linear stored as e4m3 with a float32 scale per output row (buffer `weight_scale` [out]):
    W ≈ weight · weight_scale. The matmul runs in fp8 (see the design note above); for small inputs and
    outside bf16 the weight is dequantised to the compute dtype for a plain matmul."""

    weight_scale: torch.Tensor

    def _fp8_pays(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        return (dtype == torch.bfloat16 and x.numel() // x.shape[-1] >= FP8_MATMUL_MIN_ROWS
                and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self._fp8_pays(x, dtype):
            y = _Fp8Matmul.apply(x, self.weight, self.weight_scale, dtype)
            return y if bias is None else y + bias
        w = (self.weight.float() * self.weight_scale.view(-1, 1)).to(dtype)
        return nn.functional.linear(x.to(dtype), w, bias)


def apply_fp8_matmul(model: Flux, work_device: torch.device | str | None = None) -> list[str]:
    """Quantise every frozen block Linear of a bf16/fp32 `model` to e4m3 with per-row scales (`Fp8ScaledLinear`),
    in place. Each weight is quantised on `work_device` (the GPU: fast, and only one bf16 weight there at a
    time) and goes back where it was, so a model in host memory stays there. Returns the names converted."""
    converted = []
    for prefix, blocks in (("double_blocks", model.double_blocks), ("single_blocks", model.single_blocks)):
        for name, module in blocks.named_modules():
            if type(module) is Fp8Linear:
                raise UserError("--fp8_matmul quantises the bf16 weights itself: load the transformer in "
                                "bf16, not with fp8 storage")
            if type(module) is not nn.Linear or module.weight.requires_grad:
                continue  # frozen base Linears only (not a LoRA's own, if one is injected already)
            weight = module.weight.data
            w = weight.to(work_device) if work_device is not None else weight
            q, scale = quantize_rows(w)
            module.__class__ = Fp8ScaledLinear
            module.weight = nn.Parameter(q.to(weight.device), requires_grad=False)
            module.register_buffer("weight_scale", scale.view(-1).to(weight.device), persistent=False)
            converted.append(f"{prefix}.{name}")
            del weight, w, q
    return converted


# -- block swap ----------------------------------------------------------------------------------------------
# Design note (kohya --blocks_to_swap N): the weights of the last N//2 double blocks and 2*(N - N//2) single
# blocks (a double block is about twice a single one) live in host memory; everything else stays on the
# device. Module hooks move a block's weights in just before it runs and out right after, so at most a
# couple of swapped blocks are resident at once. Moving is `param.data = ...`: autograd's saved references
# to a weight share its tensor object, so a backward pre-hook that moves the weights back in before the
# block's backward makes them visible to its gradient computation again (kohya's approach too). A matmul
# saves a *view* of its weight (`weight.t()`), which would keep the device copy alive until backward: while a
# swapped block runs forward, a saved-tensor hook stores such views as (parameter, size, stride, offset) and
# rebuilds them from the parameter in backward, so the copy is freed when the block leaves. Under
# gradient checkpointing the block's recompute runs inside backward; the weights then stay until the
# block's backward hook. On CUDA, host copies are pinned and the next swapped block is copied in on a side
# stream while the current one computes: block i+1 when block i starts its forward, block i-1 when block i
# starts its backward (blocks run in reverse there), so the copies overlap both passes and at most two
# swapped blocks are resident at once. Only the first swapped block of the forward and the last one of the
# backward wait for their copy. `prefetch=True` on the CPU runs the same bookkeeping with plain copies (the
# tests check the order of moves with it).
class BlockSwap:
    def __init__(self, model: Flux, n: int, device: torch.device, prefetch: bool | None = None):
        n_double, n_single = n // 2, 2 * (n - n // 2)
        depth, single = len(model.double_blocks), len(model.single_blocks)
        if n < 0 or n_double > depth or n_single > single:
            raise UserError(f"blocks_to_swap {n}: this model has {depth} double and {single} single blocks; "
                            f"{n} swaps {n_double} double and {n_single} single blocks - use a smaller number")
        self.device = device
        self.blocks: list[nn.Module] = ([*model.double_blocks][depth - n_double:]
                                        + [*model.single_blocks][single - n_single:])
        self.names = ([f"double_blocks.{i}" for i in range(depth - n_double, depth)]
                      + [f"single_blocks.{i}" for i in range(single - n_single, single)])
        self.resident: set[int] = set()  # indices into self.blocks whose weights are on the device
        self.moves: list[tuple[str, str]] = []  # ("in" | "out", block name): bookkeeping for tests and logs
        self.record = False
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready: dict[int, torch.cuda.Event] = {}
        self.prefetch = self._stream is not None if prefetch is None else prefetch
        # Only frozen weights move: trainable ones (LoRA) stay where the optimizer and their grads live.
        self.host = [{name: self._pin(p.data) for name, p in b.named_parameters() if not p.requires_grad}
                     for b in self.blocks]
        swapped = set()
        for i, b in enumerate(self.blocks):
            for name, p in b.named_parameters():
                if name in self.host[i]:
                    p.data = self.host[i][name]
                    swapped.add(id(p))
        # Everything else goes to the device, tensor by tensor (what `model.to` does, minus the swapped
        # weights: moving the whole model first would peak at its full size on the device before step one).
        model._apply(lambda t: t if id(t) in swapped else t.to(device))
        self._saving: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles += [
                block.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)),
                block.register_forward_hook(lambda m, a, o, i=i: self._leave(i), always_call=True),
                block.register_full_backward_pre_hook(lambda m, g, i=i: self._enter_backward(i)),
                block.register_full_backward_hook(lambda m, gi, go, i=i: self.send_out(i)),
            ]

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")
        return t.pin_memory() if self._stream is not None else t

    def _log(self, kind: str, i: int) -> None:
        if self.record:
            self.moves.append((kind, self.names[i]))

    def _enter(self, i: int) -> None:
        self.bring_in(i)
        if self.prefetch and i + 1 < len(self.blocks) and torch._C._current_graph_task_id() == -1:
            self.bring_in(i + 1, wait=False)  # overlap the next swapped block's copy with this block
        # Not inside other saved-tensor hooks (an eager checkpoint's: it keeps no weights, and ours would
        # shadow it, since only the innermost hooks apply).
        if torch.is_grad_enabled() and i not in self._saving and \
                torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            self._saving[i] = self._save_by_parameter(i)
            self._saving[i].__enter__()

    def _save_by_parameter(self, i: int) -> torch.autograd.graph.saved_tensors_hooks:
        """Saved tensors that share a swapped weight's device storage are kept as a recipe on the parameter."""
        by_storage = {p.untyped_storage().data_ptr(): p for n, p in self.blocks[i].named_parameters()
                      if n in self.host[i]}

        def pack(t: torch.Tensor):
            p = by_storage.get(t.untyped_storage().data_ptr()) if t.device.type == self.device.type else None
            if p is None or t.dtype != p.dtype:
                return t
            return p, tuple(t.shape), tuple(t.stride()), t.storage_offset()

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            p, size, stride, offset = saved
            return p.as_strided(size, stride, offset)  # the parameter is back on the device by then

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _enter_backward(self, i: int) -> None:
        self.bring_in(i)
        if self.prefetch and i > 0:
            self.bring_in(i - 1, wait=False)  # backward runs the blocks in reverse: the next one is i - 1

    def _leave(self, i: int) -> None:
        saving = self._saving.pop(i, None)
        if saving is not None:
            saving.__exit__(None, None, None)
        # Inside backward (checkpoint recompute) the weights are about to be used: the backward hook evicts.
        if torch._C._current_graph_task_id() == -1:
            self.send_out(i)

    def bring_in(self, i: int, wait: bool = True) -> None:
        if i not in self.resident:
            self.resident.add(i)
            self._log("in", i)
            params = {n: p for n, p in self.blocks[i].named_parameters() if n in self.host[i]}
            if self._stream is None:
                for name, p in params.items():
                    p.data = self.host[i][name].to(self.device, copy=True)  # a copy on the CPU too (tests)
            else:
                current = torch.cuda.current_stream(self.device)
                targets = {name: torch.empty_like(t, device=self.device) for name, t in self.host[i].items()}
                self._stream.wait_stream(current)  # the buffers were allocated in the compute stream's order
                with torch.cuda.stream(self._stream):
                    for name, t in targets.items():
                        t.copy_(self.host[i][name], non_blocking=True)
                    self._ready[i] = torch.cuda.Event()
                    self._ready[i].record(self._stream)
                for name, p in params.items():
                    p.data = targets[name]
        if wait and i in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready.pop(i))

    def send_out(self, i: int) -> None:
        if i in self.resident:
            self.resident.discard(i)
            self._log("out", i)
            pending = self._ready.pop(i, None)
            if pending is not None:  # a prefetch never waited for: its copy must finish before the free
                torch.cuda.current_stream(self.device).wait_event(pending)
            for name, p in self.blocks[i].named_parameters():
                if name in self.host[i]:
                    p.data = self.host[i][name]  # the device copy is freed once nothing else uses it

    def evict_all(self) -> None:
        for i in sorted(self.resident):
            self.send_out(i)

    def remove(self) -> None:
        self.evict_all()
        for h in self._handles:
            h.remove()
