"""Regional compilation of the FLUX transformer: `torch.compile` each double / single block's forward.

Design note. Compiling the whole model would trace 57 blocks into one graph (minutes of compile time) and
would swallow gradient checkpointing, block swap and the cpu-offload logic that run *between* blocks.
Compiling each block's `forward` instead:

- gives two graphs in all (one per block type): with `inline_inbuilt_nn_modules` (torch >= 2.5, default)
  the parameters are graph inputs, so the 19 double blocks share one compiled graph and the 38 single
  blocks another;
- keeps the module tree and the state-dict names untouched (no `_orig_mod.` prefix): LoRA save/load and
  strict checkpoint loading see the same keys;
- leaves `Module.__call__` eager, so forward / backward hooks (block swap moves the weights there) run
  exactly as without compile. That is why the instance's `forward` is replaced rather than using
  `Module.compile()`, which would compile `_call_impl` and trace the block-swap hooks (`param.data = ...`)
  into the graph.

Gradient checkpointing inside the graph. Each block gets a second compiled variant, its forward wrapped in
`torch.utils.checkpoint`, which `Flux._run` calls (through `checkpointed_call`) for the blocks it
recomputes. Dynamo turns the checkpoint into a region the partitioner must recompute: the forward graph
saves only the block's inputs, and the backward graph recomputes the forward and differentiates it in one
call. An eager `checkpoint(block, ...)` around the compiled forward instead costs three graph calls per
block and step (forward, the recompute's forward, backward) plus the checkpoint's Python bookkeeping; at
512² the step is host-bound and that third call is most of what checkpointing costs (BENCHMARKS.md, issue
11 part c). Block swap still works: its backward pre-hook brings the weights in before the backward graph
reads them.

LoRA modules injected before this call are traced inside the block graphs (their tiny matmuls and the
adds fuse with the surrounding work). Python attributes the LoRA reads (multiplier, enabled, scale) are
guarded: changing them later triggers a recompile, not a wrong result.

Shapes: the sequence length changes with the bucket. `dynamic=False` (default) specialises every graph to
its shapes, the fastest kernels, one compile per (block type, bucket); the recompile limit is raised to
`max_shapes` so that bucketed training does not fall back to eager after 8 shapes. `dynamic=True` marks
sizes symbolic (one compile for every bucket, somewhat slower kernels); `dynamic=None` is torch's
automatic mode (static first, symbolic once a second shape shows up).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)
_ORIGINAL = "_flux_uncompiled_forward"  # attribute keeping a compiled block's own forward
_CHECKPOINT = "_flux_checkpoint"  # keyword of a compiled block's forward: run the checkpointed variant
_IN_GRAPH = "_flux_checkpoint_in_graph"  # attribute: checkpointed_call uses that variant
# A compiler that cannot run here (no C compiler / Triton, an inductor bug): the blocks fall back to eager.
# Errors of the computation itself (out of memory, shape errors in eager code) are not caught.
_FALLBACK_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError)


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose forward `apply_compile` replaced."""
    return [b for b in _blocks(model) if hasattr(b, _ORIGINAL)]


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


def apply_compile(model: nn.Module, backend: str = "inductor", dynamic: bool | None = False,
                  mode: str | None = None, fullgraph: bool = False, max_shapes: int = 64,
                  checkpoint_in_graph: bool = True) -> int:
    """Compile every double and single block's forward in place; returns the number of blocks compiled.

    Call it last in the model setup (after freezing, LoRA injection, fp8 storage, block swap and
    `enable_gradient_checkpointing`); calling it again recompiles from the original forwards.
    `backend` is a `torch.compile` backend ("inductor"; "aot_eager" / "eager" for debugging), `mode` an
    inductor mode (e.g. "max-autotune-no-cudagraphs"; CUDA-graph modes were not tried with checkpointing
    or block swap). `checkpoint_in_graph=False` keeps the older eager checkpoint around the compiled
    forward for checkpointed blocks (for comparison; see the design note).
    """
    if max_shapes > 0:
        # A process-wide torch setting: every block type compiles once per bucket shape when static.
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), max_shapes))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * max_shapes)
    options = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    if mode is not None:
        options["mode"] = mode
    blocks = _blocks(model)
    state = {"failed": False}  # shared by every block: after one failure all of them run eager
    for block in blocks:
        original = getattr(block, _ORIGINAL, None) or block.forward
        setattr(block, _ORIGINAL, original)
        setattr(block, _IN_GRAPH, checkpoint_in_graph)
        recomputed = functools.partial(_checkpointed, original)
        block.forward = _with_fallback(torch.compile(original, **options), original,
                                       torch.compile(recomputed, **options), recomputed, state)
    return len(blocks)


def _checkpointed(forward: Callable[..., Any], *args: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False)


def checkpointed_call(block: nn.Module, *args: Any) -> Any:
    """`block(*args)` with its activations recomputed in backward: inside the compiled graphs for a block
    `apply_compile` compiled, an eager `torch.utils.checkpoint` around the call otherwise. Either way the
    block's module hooks run once around the forward (and its backward hooks around the backward)."""
    if getattr(block, _IN_GRAPH, False):
        return block(*args, **{_CHECKPOINT: True})
    return checkpoint(block, *args, use_reentrant=False)


def _with_fallback(compiled: Callable[..., Any], original: Callable[..., Any], compiled_checkpointed:
                   Callable[..., Any], checkpointed: Callable[..., Any], state: dict) -> Callable[..., Any]:
    """The compiled forward (its checkpointed variant with `_flux_checkpoint=True`); if compiling fails,
    one warning line and the eager forward (an eager checkpoint of it) from then on."""
    def forward(*args: Any, _flux_checkpoint: bool = False, **kwargs: Any) -> Any:
        if _flux_checkpoint:
            compiled_fn, original_fn = compiled_checkpointed, checkpointed
        else:
            compiled_fn, original_fn = compiled, original
        if not state["failed"]:
            try:
                return compiled_fn(*args, **kwargs)
            except _FALLBACK_ERRORS as err:
                state["failed"] = True
                cause = getattr(err, "inner_exception", None) or err  # the backend's own error
                first = (str(cause).strip().splitlines() or [""])[0][:200]
                log.warning("torch.compile failed (%s: %s); the transformer blocks run eager instead",
                            type(cause).__name__, first)
        return original_fn(*args, **kwargs)

    return forward


def remove_compile(model: nn.Module) -> None:
    """Give every compiled block its eager forward back."""
    for block in compiled_blocks(model):
        original = getattr(block, _ORIGINAL)
        delattr(block, _ORIGINAL)
        delattr(block, _IN_GRAPH)
        if "forward" in vars(block):
            del block.forward  # the class's forward shows through again
        assert block.forward.__func__ is original.__func__
