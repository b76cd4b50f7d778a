"""kohya's `--network_args` for the FLUX LoRA network, parsed once into a typed config.

Every key kohya's `networks/lora_flux.py` understands is accepted (values arrive as strings from the CLI,
or already typed from a TOML config); unknown keys are a `UserError` naming the key, with a suggestion.
Rank priority per module, as kohya: `network_reg_dims` (first matching regex) > per-type dims / `in_dims` >
`network_dim`; unselected blocks (`train_blocks`, `train_*_block_indices`) get rank 0 (no module).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from library.errors import UserError, closest

NUM_DOUBLE_FLUX1 = 19
NUM_SINGLE_FLUX1 = 38

TYPE_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                 "single_dim", "single_mod_dim")
# kohya matches these substrings of the lora name, first match wins (so a double block's img_mod wins
# before the generic `modulation`, which only single blocks have).
_TYPE_DIM_MATCH = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)),
                   ("img_mlp_dim", ("img_mlp",)), ("txt_mlp_dim", ("txt_mlp",)),
                   ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
                   ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))
IN_DIMS_ORDER = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
KNOWN_KEYS = frozenset({
    "train_blocks", "train_double_block_indices", "train_single_block_indices", *TYPE_DIM_KEYS, "in_dims",
    "network_reg_dims", "network_reg_lrs", "rank_dropout", "module_dropout", "split_qkv", "train_t5xxl",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "verbose",
    "conv_dim", "conv_alpha", "dropout",
})
# understood by kohya but not implemented here: refuse rather than ignore
UNSUPPORTED_KEYS = {"ggpo_sigma": "LoRA-GGPO", "ggpo_beta": "LoRA-GGPO"}


@dataclass(frozen=True)
class NetworkArgs:
    train_blocks: str = "all"
    double_indices: frozenset[int] | None = None  # None = all
    single_indices: frozenset[int] | None = None
    type_dims: dict[str, int] = field(default_factory=dict)
    in_dims: tuple[int, ...] | None = None
    reg_dims: tuple[tuple[str, int], ...] = ()
    reg_lrs: tuple[tuple[str, float], ...] = ()
    rank_dropout: float | None = None
    module_dropout: float | None = None
    split_qkv: bool = False
    train_t5xxl: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False


def _bool(key: str, v: object) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no", "none", ""):
        return False
    raise UserError(f"--network_args: {key}={v!r}: expected True or False")


def _num(key: str, v: object, kind: type) -> float | int | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none")):
        return None
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise UserError(f"--network_args: {key}={v!r}: expected {'an integer' if kind is int else 'a number'}")


def parse_indices(key: str, v: object, n_blocks: int) -> frozenset[int] | None:
    """`all` / `none` / `""` / `0,1,8-12,18`, bounds-checked against the number of blocks."""
    s = str(v).strip().lower()
    if s == "all":
        return None
    if s in ("none", ""):
        return frozenset()
    out: set[int] = set()
    for part in s.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--network_args: {key}={v!r}: expected 'all', 'none' or a list like 0,1,8-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_blocks:
            raise UserError(f"--network_args: {key}: {part.strip()} is outside 0-{n_blocks - 1}")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def _pairs(key: str, v: object, kind: type) -> tuple[tuple[str, float | int], ...]:
    out = []
    for item in str(v).split(","):
        if not item.strip():
            continue
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern.strip():
            raise UserError(f"--network_args: {key}: {item!r}: expected regex=value")
        try:
            re.compile(pattern.strip())
        except re.error as e:
            raise UserError(f"--network_args: {key}: bad regex {pattern.strip()!r}: {e}") from None
        out.append((pattern.strip(), _num(key, value.strip(), kind)))
    return tuple(out)


def _in_dims(v: object) -> tuple[int, ...]:
    items = v if isinstance(v, (list, tuple)) else str(v).strip().strip("[]").split(",")
    try:
        dims = tuple(int(str(x).strip()) for x in items)
    except ValueError:
        dims = ()
    if len(dims) != 5:
        raise UserError(f"--network_args: in_dims={v!r}: expected 5 integers [img_in,time_in,vector_in,"
                        "guidance_in,txt_in]")
    return dims


def _check_ranges(raw: dict[str, object], type_dims: dict[str, int | None]) -> None:
    """Dropout probabilities in [0, 1), ratios and ranks finite and non-negative (kohya fails at the first step)."""
    for key in ("rank_dropout", "module_dropout"):
        v = _num(key, raw.get(key), float)
        if v is not None and not 0 <= v < 1:
            raise UserError(f"--network_args: {key}={v:g}: must be a probability in [0, 1)")
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        v = _num(key, raw.get(key), float)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserError(f"--network_args: {key}={v:g}: must be a positive finite number")
    for key, v in type_dims.items():
        if v is not None and v < 0:
            raise UserError(f"--network_args: {key}={v}: a rank must be >= 0 (0: not trained)")


def parse_network_args(raw: dict[str, object], n_double: int = NUM_DOUBLE_FLUX1,
                       n_single: int = NUM_SINGLE_FLUX1) -> NetworkArgs:
    """Validate kohya `--network_args` (a key→value dict) into `NetworkArgs`."""
    for key in raw:
        if key in UNSUPPORTED_KEYS:
            raise UserError(f"--network_args: {key}: {UNSUPPORTED_KEYS[key]} is not supported by this trainer")
        if key not in KNOWN_KEYS:
            near = closest(key, sorted(KNOWN_KEYS))
            hint = f"; did you mean {near}?" if near else ""
            raise UserError(f"--network_args: unknown key {key!r}{hint}")
    tb = str(raw.get("train_blocks", "all")).strip().lower()
    if tb not in ("all", "single", "double"):
        raise UserError(f"--network_args: train_blocks={tb!r}: expected all, single or double")
    type_dims = {k: _num(k, raw[k], int) for k in TYPE_DIM_KEYS if raw.get(k) is not None}
    _check_ranges(raw, type_dims)
    return NetworkArgs(
        train_blocks=tb,
        double_indices=(parse_indices("train_double_block_indices", raw["train_double_block_indices"], n_double)
                        if "train_double_block_indices" in raw else None),
        single_indices=(parse_indices("train_single_block_indices", raw["train_single_block_indices"], n_single)
                        if "train_single_block_indices" in raw else None),
        type_dims={k: v for k, v in type_dims.items() if v is not None},
        in_dims=_in_dims(raw["in_dims"]) if raw.get("in_dims") not in (None, "", "None") else None,
        reg_dims=_pairs("network_reg_dims", raw["network_reg_dims"], int) if raw.get("network_reg_dims") else (),
        reg_lrs=_pairs("network_reg_lrs", raw["network_reg_lrs"], float) if raw.get("network_reg_lrs") else (),
        rank_dropout=_num("rank_dropout", raw.get("rank_dropout"), float),
        module_dropout=_num("module_dropout", raw.get("module_dropout"), float),
        split_qkv=_bool("split_qkv", raw.get("split_qkv", False)),
        train_t5xxl=_bool("train_t5xxl", raw.get("train_t5xxl", False)),
        loraplus_lr_ratio=_num("loraplus_lr_ratio", raw.get("loraplus_lr_ratio"), float),
        loraplus_unet_lr_ratio=_num("loraplus_unet_lr_ratio", raw.get("loraplus_unet_lr_ratio"), float),
        loraplus_text_encoder_lr_ratio=_num("loraplus_text_encoder_lr_ratio",
                                            raw.get("loraplus_text_encoder_lr_ratio"), float),
        verbose=_bool("verbose", raw.get("verbose", False)),
    )


def transformer_rank(args: NetworkArgs, lora_name: str, module_path: str, network_dim: int) -> int:
    """kohya's rank for a transformer module (0 = not trained)."""
    rank = None
    for pattern, dim in args.reg_dims:
        if re.search(pattern, lora_name):
            rank = int(dim)
            break
    if module_path.startswith(("double_blocks.", "single_blocks.")):
        kind, idx = module_path.split(".")[:2]
        if args.train_blocks not in ("all", kind.split("_")[0]):
            return 0
        allowed = args.double_indices if kind == "double_blocks" else args.single_indices
        if allowed is not None and int(idx) not in allowed:
            return 0
        if rank is None:
            for key, subs in _TYPE_DIM_MATCH:
                if key in args.type_dims and all(s in lora_name for s in subs):
                    rank = args.type_dims[key]
                    break
        return network_dim if rank is None else rank
    head = module_path.split(".")[0]
    if args.in_dims is None or head not in IN_DIMS_ORDER:  # kohya never searches final_layer
        return 0
    return args.in_dims[IN_DIMS_ORDER.index(head)] if rank is None else rank
