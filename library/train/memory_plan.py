"""Memory as a knob: predict a LoRA step's peak GPU memory and time, and pick the fastest setup that fits.

Design note. The peak of a step (torch.cuda.max_memory_allocated) is a sum of parts that each follow from
the model's shapes and the batch:

    resident base weights (bf16, or e4m3 for the block Linears with fp8; minus the swapped blocks'
    frozen weights, plus two swapped blocks in flight)
  + LoRA state: weights, gradients and the optimizer's moments (bytes per trainable parameter)
  + activations: tokens x [k x saved_per_block + (N - k) x full_per_block + working set]

where k of the N blocks are checkpointed (recomputed in backward: only their inputs are kept) and the
others keep every activation. Activations are linear in the tokens (image + text, times the batch): the
measured peaks at 512² and 1024² confirm it to 1-2% (BENCHMARKS.md, "memory model"). The step time is
FLOPs over an effective rate plus a fixed per-step cost; recomputing k blocks adds k/N of a forward, fp8
storage multiplies by its upcast cost, and swapping costs the host-to-device copy time that the compute
does not hide. The constants (`Calibration`) were fitted to device measurements; `predict` is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from library.flux.model import Flux, FluxParams
from networks import lora_flux

GiB = 2 ** 30
CARD_SIZES_GIB = (80, 48, 24, 16, 12)


@dataclass(frozen=True)
class Calibration:
    """Device-measured constants (torch 2.11, bf16 autocast, SDPA); see BENCHMARKS.md. The memory constants
    were fitted on an H200 and reproduce the H100's peaks too (the allocator does not depend on the card);
    the time constants are per card (`CALIBRATIONS`)."""

    saved_per_block_token: float = 6.2e3  # bytes kept per token for a checkpointed block (its inputs)
    full_per_block_token: float = 116e3  # bytes kept per token by a block that is not recomputed (compiled)
    full_per_block_token_eager: float = 140e3  # the same without torch.compile (unfused elementwise)
    work_per_token: float = 185e3  # bytes per token of one block's recompute + backward working set
    fixed_bytes: float = 0.15 * GiB  # embedders' activations, RoPE table, cuBLAS/cuDNN workspaces
    rate_flops: float = 507e12  # effective FLOP/s of the step's matmul work (compiled)
    rate_flops_eager: float = 411e12
    fixed_step_s: float = 0.071  # per-step cost independent of size (launches, optimizer, host) compiled
    fixed_step_s_eager: float = 0.164
    fp8_factor: float = 1.10  # step time with e4m3 storage (upcast per matmul) / bf16; not measured on an H200
    fp8_matmul_factor: float = 1.0  # step time with --fp8_matmul / bf16; not measured on an H200
    h2d_bytes_per_s: float = 54e9  # pinned host->device copy rate (measured on the H100's host; PCIe 5)


# Fitted to the step bench and the trainer's own step times (BENCHMARKS.md): H200 on 2026-11-21 (step bench),
# H100 on 2026-12-07 (step bench, trainer end to end, eager cost curves, tools/check_block_swap_cuda.py's
# pinned copy rate). A card not listed gets the H100's constants (the slower of the two) and says so.
CALIBRATIONS = {
    "H200": Calibration(),
    "H100": Calibration(rate_flops=473e12, fixed_step_s=0.094, rate_flops_eager=321e12,
                        fixed_step_s_eager=0.110, fp8_factor=1.016, h2d_bytes_per_s=54e9),
}


def calibration_for(device_name: str | None) -> tuple[Calibration, str]:
    """The constants for a CUDA device name and how they were chosen (a phrase for the logs)."""
    for key, cal in CALIBRATIONS.items():
        if device_name and key in device_name.upper():
            return cal, f"calibrated on an {key}"
    why = f"the {device_name} is not calibrated" if device_name else "no CUDA device here"
    return CALIBRATIONS["H100"], f"with H100 constants ({why}; its times are rough)"


@dataclass(frozen=True)
class Workload:
    """What the step has to hold: sizes read from the checkpoint, the largest bucket, the LoRA."""

    n_double: int
    n_single: int
    hidden: int
    mlp_hidden: int
    block_linear_params: tuple[int, int]  # (double block, single block) Linear weights: fp8-able, swappable
    block_other_params: tuple[int, int]  # (double, single) biases and norm scales
    token_params: int  # Linear weights one token meets in one block (a double block's stream, a single block)
    other_params: int  # embedders, final layer (always resident, never fp8)
    img_tokens: int  # of the largest bucket, per sample
    txt_tokens: int
    batch: int
    lora_params: int
    lora_state_bytes_per_param: float = 16.0  # fp32 weight + fp32 grad + AdamW's two fp32 moments
    compiled: bool = True

    @property
    def n_blocks(self) -> int:
        return self.n_double + self.n_single

    @property
    def tokens(self) -> int:
        return self.batch * (self.img_tokens + self.txt_tokens)


@dataclass(frozen=True)
class Choice:
    checkpointed_blocks: int  # recomputed blocks, in forward order; 0 = no checkpointing
    fp8: bool
    blocks_to_swap: int
    fp8_matmul: bool = False  # --fp8_matmul (implies fp8 storage); never chosen, only kept when the user set it

    def describe(self, n_blocks: int) -> str:
        ck = "no checkpointing" if not self.checkpointed_blocks else "checkpointing" \
            if self.checkpointed_blocks == n_blocks else f"checkpointing {self.checkpointed_blocks}/{n_blocks} blocks"
        fp8 = ["fp8 matmuls"] if self.fp8_matmul else ["fp8 base"] if self.fp8 else []
        return ", ".join([ck] + fp8 +
                         ([f"{self.blocks_to_swap} blocks swapped"] if self.blocks_to_swap else []))


@dataclass(frozen=True)
class Prediction:
    choice: Choice
    peak_gib: float
    step_s: float


def swapped_counts(n: int, w: Workload) -> tuple[int, int]:
    """kohya's --blocks_to_swap n: n//2 double and 2(n - n//2) single blocks (Flux.enable_block_swap)."""
    return min(n // 2, w.n_double), min(2 * (n - n // 2), w.n_single)


def max_swap(w: Workload, limit: int = 35) -> int:
    return max(n for n in range(limit + 1) if n // 2 <= w.n_double and 2 * (n - n // 2) <= w.n_single)


def forward_flops(w: Workload) -> float:
    """2 x params x tokens for the block Linears, 4 S² hidden per block for attention (perf-anchors §5),
    plus the LoRA's matmuls (2 x its params x tokens, an upper bound: every target sees every token)."""
    s = w.img_tokens + w.txt_tokens
    dense = 2.0 * w.token_params * w.n_blocks * s  # modulation Linears act on one vector: left out
    attention = 4.0 * s * s * w.hidden * w.n_blocks
    return w.batch * (dense + attention + 2.0 * w.lora_params * s)


def predict(w: Workload, c: Choice, cal: Calibration = Calibration()) -> Prediction:
    lin_d, lin_s = w.block_linear_params
    oth_d, oth_s = w.block_other_params
    wbytes = 1 if (c.fp8 or c.fp8_matmul) else 2
    block_bytes = (lin_d * wbytes + oth_d * 2, lin_s * wbytes + oth_s * 2)
    sd, ss = swapped_counts(c.blocks_to_swap, w)
    resident = (w.n_double - sd) * block_bytes[0] + (w.n_single - ss) * block_bytes[1] + w.other_params * 2
    if sd or ss:  # the block computing and the one being prefetched
        resident += 2 * (block_bytes[0] if sd else block_bytes[1])
    full = cal.full_per_block_token if w.compiled else cal.full_per_block_token_eager
    k = c.checkpointed_blocks
    act = w.tokens * (k * cal.saved_per_block_token + (w.n_blocks - k) * full + cal.work_per_token)
    peak = resident + w.lora_params * w.lora_state_bytes_per_param + act + cal.fixed_bytes

    rate, fixed = (cal.rate_flops, cal.fixed_step_s) if w.compiled else (cal.rate_flops_eager, cal.fixed_step_s_eager)
    f = forward_flops(w)
    forward = f / rate * (cal.fp8_matmul_factor if c.fp8_matmul else cal.fp8_factor if c.fp8 else 1.0)
    compute = forward * (2.0 + k / w.n_blocks)
    exposed = swap_exposed_s(w, c, forward / w.n_blocks, block_bytes, cal) if (sd or ss) else 0.0
    return Prediction(c, peak / GiB, compute + fixed + exposed)


def swap_exposed_s(w: Workload, c: Choice, block_fwd_s: float, block_bytes: tuple[int, int],
                   cal: Calibration) -> float:
    """The copy time block swap cannot hide (Flux.enable_block_swap's schedule): swapped block j is copied
    in while the blocks since the previous swapped one compute (forward), or since the next one (backward,
    where blocks run in reverse); the first swapped block of each pass waits for its whole copy. Every
    block costs the same forward time (each token meets 12·hidden² weights in a double block's stream and
    in a single block); a backward costs two forwards, three when the block is recomputed."""
    sd, ss = swapped_counts(c.blocks_to_swap, w)
    copy = [block_bytes[0] / cal.h2d_bytes_per_s] * w.n_double + [block_bytes[1] / cal.h2d_bytes_per_s] * w.n_single
    bwd = [block_fwd_s * (3.0 if j < c.checkpointed_blocks else 2.0) for j in range(w.n_blocks)]
    swapped = [*range(w.n_double - sd, w.n_double), *range(w.n_blocks - ss, w.n_blocks)]  # forward order

    def exposed(seq: list[int], window: Callable[[int, int], float]) -> float:
        return copy[seq[0]] + sum(max(0.0, copy[j] - window(prev, j)) for prev, j in zip(seq, seq[1:]))

    return exposed(swapped, lambda prev, j: (j - prev) * block_fwd_s) + \
        exposed(swapped[::-1], lambda prev, j: sum(bwd[j + 1:prev + 1]))


def candidates(w: Workload, fp8: bool | None = None, swap: int | None = None,
               checkpointed: int | None = None, fp8_matmul: bool = False) -> list[Choice]:
    """Every setup, or only those agreeing with what the user fixed (None: free). Block swap is offered
    with full checkpointing only (unless the user fixed both): the swapped blocks are the last ones and
    selective checkpointing keeps the last blocks' activations, a combination not measured on the device."""
    ks = [checkpointed] if checkpointed is not None else list(range(w.n_blocks + 1))
    fps = [True] if fp8_matmul else [fp8] if fp8 is not None else [False, True]
    swaps = [swap] if swap is not None else list(range(0, max_swap(w) + 1))
    return [Choice(k, f, s, fp8_matmul) for f in fps for s in swaps for k in ks
            if s == 0 or k == w.n_blocks or checkpointed is not None]


def usable_gib(card_gib: float) -> float:
    """What the allocator may hand out on a card of that size: the CUDA context and allocator slack
    (fragmentation between the peak's tensors) take about 6% plus half a GiB."""
    return 0.94 * card_gib - 0.5


def choose(w: Workload, budget_gib: float, cal: Calibration = Calibration(), **fixed: int | bool | None
           ) -> Prediction | None:
    """The fastest predicted setup whose peak fits `budget_gib` (a card size); None if none fits.
    Ties go to the plainer setup (bf16 before fp8, fewer swapped blocks)."""
    limit = usable_gib(budget_gib)
    best = None
    for c in candidates(w, **fixed):
        p = predict(w, c, cal)
        if p.peak_gib <= limit and (best is None or p.step_s < best.step_s - 1e-9):
            best = p
    return best


def fits_table(w: Workload, cal: Calibration = Calibration(), sizes: tuple[float, ...] = CARD_SIZES_GIB,
               **fixed: int | bool | None) -> list[tuple[float, Prediction | None]]:
    return [(size, choose(w, size, cal, **fixed)) for size in sizes]


def format_prediction(p: Prediction | None, n_blocks: int) -> str:
    if p is None:
        return "does not fit"
    return f"{p.choice.describe(n_blocks)}: peak {p.peak_gib:.1f} GiB, step {1e3 * p.step_s:.0f} ms"


def workload_for(params: FluxParams, img_tokens: int, txt_tokens: int, batch: int, rank: int,
                 compiled: bool, lora_state_bytes_per_param: float = 16.0) -> Workload:
    """Count the parameters of `params`' model and of a rank-`rank` LoRA on it (meta device: no memory)."""
    with torch.device("meta"):
        model = Flux(params)
    model.requires_grad_(False)

    def split(block: torch.nn.Module) -> tuple[int, int]:
        lin = sum(m.weight.numel() for m in block.modules() if type(m) is torch.nn.Linear)
        return lin, sum(p.numel() for p in block.parameters()) - lin

    (ld, od), (ls, os_) = split(model.double_blocks[0]), split(model.single_blocks[0])
    single = model.single_blocks[0]
    token_params = single.linear1.weight.numel() + single.linear2.weight.numel()
    other = sum(p.numel() for p in model.parameters()) - params.depth * (ld + od) - params.depth_single_blocks * (
        ls + os_)
    lora = 0
    if rank:
        network = lora_flux.create_network(1.0, rank, float(rank), model, None, None)
        network.apply_to(text_encoder=False)
        lora = sum(p.numel() for p in network.parameters())
    return Workload(params.depth, params.depth_single_blocks, params.hidden_size,
                    int(params.hidden_size * params.mlp_ratio), (ld, ls), (od, os_), token_params, other,
                    img_tokens, txt_tokens,
                    batch, lora, lora_state_bytes_per_param, compiled)
