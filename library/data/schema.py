"""The dataset TOML schema as data: every key kohya's `config_util.py` accepts, where, and its default.

Levels: "general" (`[general]`), "dataset" (`[[datasets]]`), "subset" (`[[datasets.subsets]]`).
Styles: "dreambooth" (image_dir + caption files), "finetune" (metadata_file), "control"
(conditioning_data_dir: Kontext-style image pairs, or loss masks under --masked_loss).
`styles` restricts a key to subsets/datasets of those styles; at [general] every key is accepted and is
simply not inherited by datasets whose style does not use it (as kohya does).

Defaults are kohya's *effective* defaults, i.e. the argparse defaults that its BlueprintGenerator falls
back to (caption_extension ".caption", min_bucket_reso 256, ...), not its dataclass defaults (which carry
the tuple-typed `(",",)` defect).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from library.errors import closest
from library.flux.geometry import PIXEL_MULTIPLE

GENERAL, DATASET, SUBSET = "general", "dataset", "subset"
DREAMBOOTH, FINETUNE, CONTROL = "dreambooth", "finetune", "control"
ALL_STYLES = frozenset({DREAMBOOTH, FINETUNE, CONTROL})

FLUX_MULTIPLE = PIXEL_MULTIPLE  # AE /8 and 2x2 patchify: every trained size must be a multiple of 16 pixels

# Pillow filters behind kohya's resize_interpolation names ("area" is Pillow's BOX filter).
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # bool | int | float | str | resolution | float_pair | dict | path | degradation
    levels: frozenset[str]
    default: Any = None
    styles: frozenset[str] = ALL_STYLES
    cli: str | None = None  # name of the CLI flag that fills it (kohya's argparse fallback)
    min: float | None = None
    max: float | None = None
    max_exclusive: bool = False
    required: frozenset[str] = frozenset()  # styles for which a subset must set it
    doc: str = ""


_DS = frozenset({GENERAL, DATASET})
_ALL = frozenset({GENERAL, DATASET, SUBSET})
_S = frozenset({SUBSET})
_DB_CN = frozenset({DREAMBOOTH, CONTROL})


def _k(name: str, kind: str, levels: frozenset[str], default: Any = None, *, cli: str | None = "",
       **kw: Any) -> Key:
    # cli="" means "same name as the key"; cli=None means "no CLI flag".
    return Key(name, kind, levels, default, cli=name if cli == "" else cli, **kw)


KEYS: tuple[Key, ...] = (
    # dataset-level ([general] or [[datasets]])
    _k("resolution", "resolution", _DS, None, doc="training size: N, [W, H] or \"W,H\""),
    _k("batch_size", "int", _DS, 1, cli="train_batch_size", min=1),
    _k("enable_bucket", "bool", _DS, False),
    _k("min_bucket_reso", "int", _DS, 256, min=16),
    _k("max_bucket_reso", "int", _DS, 1024, min=16),
    _k("bucket_reso_steps", "int", _DS, 64, min=16, doc="must be a multiple of 16 for FLUX (2x2 latent patches)"),
    _k("bucket_no_upscale", "bool", _DS, False),
    _k("network_multiplier", "float", _DS, 1.0, cli=None),
    _k("validation_split", "float", _DS, 0.0, min=0.0, max=1.0, max_exclusive=True),
    _k("validation_seed", "int", _DS, None),
    _k("resize_interpolation", "str", _ALL, None, doc="one of " + ", ".join(INTERPOLATIONS)),
    # subset-level keys that may also be set at [general] / [[datasets]] and are inherited
    _k("num_repeats", "int", _ALL, 1, cli="dataset_repeats", min=0),
    _k("flip_aug", "bool", _ALL, False),
    _k("random_crop", "bool", _ALL, False),
    _k("color_aug", "bool", _ALL, False),
    _k("face_crop_aug_range", "float_pair", _ALL, None),
    _k("shuffle_caption", "bool", _ALL, False),
    _k("caption_separator", "str", _ALL, ","),
    _k("keep_tokens", "int", _ALL, 0, min=0),
    _k("keep_tokens_separator", "str", _ALL, ""),
    _k("secondary_separator", "str", _ALL, None),
    _k("enable_wildcard", "bool", _ALL, False),
    _k("caption_prefix", "str", _ALL, None),
    _k("caption_suffix", "str", _ALL, None),
    _k("caption_dropout_rate", "float", _ALL, 0.0, min=0.0, max=1.0),
    _k("caption_dropout_every_n_epochs", "int", _ALL, 0, min=0),
    _k("caption_tag_dropout_rate", "float", _ALL, 0.0, min=0.0, max=1.0),
    _k("token_warmup_min", "int", _ALL, 1, min=0),
    _k("token_warmup_step", "float", _ALL, 0.0, min=0.0),
    _k("custom_attributes", "dict", _ALL, None, cli=None),
    _k("caption_extension", "str", _ALL, ".caption", styles=_DB_CN),
    _k("class_tokens", "str", _ALL, None, styles=frozenset({DREAMBOOTH}), cli=None),
    _k("cache_info", "bool", _ALL, False, styles=_DB_CN),
    # subset-only keys (what identifies a subset)
    _k("image_dir", "path", _S, None, cli=None, required=_DB_CN),
    _k("metadata_file", "path", _S, None, cli=None, styles=frozenset({FINETUNE}), required=frozenset({FINETUNE})),
    _k("conditioning_data_dir", "path", _S, None, cli=None, styles=frozenset({CONTROL}),
       required=frozenset({CONTROL})),
    _k("before_dir", "path", _S, None, cli=None, styles=frozenset({DREAMBOOTH}),
       doc="our extension: same-named \"before\" images of image_dir's \"after\" images (differential LoRAs)"),
    _k("is_reg", "bool", _S, False, cli=None, styles=frozenset({DREAMBOOTH})),
    _k("alpha_mask", "bool", _S, False, styles=frozenset({DREAMBOOTH, FINETUNE})),
    # ours: a [datasets.subsets.degradation] table makes each image's control image (library/data/degrade.py)
    _k("degradation", "degradation", _S, None, cli=None, styles=frozenset({DREAMBOOTH, FINETUNE}),
       doc="restoration pairs: ops and ranges that degrade the image into its control image"),
)

KEY_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
DATASET_KEYS: tuple[Key, ...] = tuple(k for k in KEYS if SUBSET not in k.levels or k.name == "resize_interpolation")
SUBSET_KEYS: tuple[Key, ...] = tuple(k for k in KEYS if SUBSET in k.levels)

# Keys kohya only takes from the command line (ARGPARSE_SPECIFIC_SCHEMA): named in the error when found in TOML.
CLI_ONLY = {"debug_dataset": "--debug_dataset", "max_token_length": "--max_token_length",
            "prior_loss_weight": "--prior_loss_weight"}
# Keys of kohya's argparse that people put in a dataset TOML by mistake, with the key they meant.
ALIASES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "train_data_dir": "image_dir",
           "reg_data_dir": "image_dir (with is_reg = true)", "in_json": "metadata_file",
           "caption_extention": "caption_extension", "interpolation_type": "resize_interpolation"}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".jxl")


# ---------------------------------------------------------------------------------------------- values

def parse_value(key: Key, raw: Any, from_cli: bool = False) -> tuple[Any, str | None]:
    """Check one value's type and range; returns (value, error or None). CLI strings are parsed too."""
    kind = key.kind
    if kind == "bool":
        return (raw, None) if isinstance(raw, bool) else (None, f"expected true or false, got {show(raw)}")
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            return None, f"expected an integer, got {show(raw)}"
        return raw, _range_error(key, raw)
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            return None, f"expected a number, got {show(raw)}"
        return float(raw), _range_error(key, float(raw))
    if kind in ("str", "path"):
        if not isinstance(raw, str):
            return None, f"expected a string, got {show(raw)}"
        if kind == "path" and not raw.strip():
            return None, "expected a path, got an empty string"
        if key.name == "resize_interpolation" and raw not in INTERPOLATIONS:
            return None, f"unknown interpolation {raw!r}; use one of {', '.join(INTERPOLATIONS)}"
        if key.name == "caption_extension" and raw and not raw.startswith("."):
            raw = "." + raw  # kohya adds the missing dot
        return raw, None
    if kind == "resolution":
        return _parse_resolution(raw)
    if kind == "float_pair":
        if isinstance(raw, str):
            raw = [p.strip() for p in raw.split(",")]
            try:
                raw = [float(p) for p in raw]
            except ValueError:
                return None, f"expected two numbers like \"2.0,4.0\", got {show(raw)}"
        if (not isinstance(raw, list) or len(raw) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw)):
            return None, f"expected [low, high], got {show(raw)}"
        lo, hi = float(raw[0]), float(raw[1])
        if not 0 < lo <= hi:
            return None, f"expected 0 < low <= high, got [{lo}, {hi}]"
        return (lo, hi), None
    if kind == "dict":
        return (raw, None) if isinstance(raw, dict) else (None, f"expected a table, got {show(raw)}")
    raise AssertionError(kind)


MAX_RESOLUTION = 16384


def _parse_resolution(raw: Any) -> tuple[tuple[int, int] | None, str | None]:
    """kohya accepts N and [W, H] in TOML and "N" / "W,H" on the CLI; we also accept those strings in TOML."""
    bad = (None, f"expected N, [width, height] or \"width,height\", got {show(raw)}")
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.replace("x", ",").split(",")]
        if not all(p.isdigit() for p in parts):
            return bad
        raw = [int(p) for p in parts]
        raw = raw[0] if len(raw) == 1 else raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw, raw]
    if (not isinstance(raw, list) or len(raw) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in raw)):
        return bad
    w, h = raw
    if w < FLUX_MULTIPLE or h < FLUX_MULTIPLE:
        return None, f"expected sizes of at least {FLUX_MULTIPLE}, got {w}x{h}"
    if w > MAX_RESOLUTION or h > MAX_RESOLUTION:  # 100000 would allocate tens of GB per image
        return None, f"expected sizes of at most {MAX_RESOLUTION}, got {w}x{h}"
    return (w, h), None


def _range_error(key: Key, v: float) -> str | None:
    if key.min is not None and v < key.min:
        return f"must be >= {key.min:g}, got {v:g}"
    if key.max is not None and (v >= key.max if key.max_exclusive else v > key.max):
        op = "<" if key.max_exclusive else "<="
        return f"must be {op} {key.max:g}, got {v:g}"
    return None


def show(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (bool, int, float, str, list, type(None))) else repr(v)
    return s if len(s) < 60 else s[:57] + "..."


def unknown_key_error(where: str, name: str, level: str) -> str:
    spot = f"{where}.{name}" if where else name
    key = KEY_BY_NAME.get(name)
    if key is not None:  # a real key at the wrong level
        allowed = " or ".join({GENERAL: "[general]", DATASET: "[[datasets]]", SUBSET: "[[datasets.subsets]]"}[lv]
                              for lv in (GENERAL, DATASET, SUBSET) if lv in key.levels)
        return f"{spot}: not allowed in {_level_name(level)}; set it in {allowed}"
    if name in CLI_ONLY:
        return f"{spot}: only settable on the command line ({CLI_ONLY[name]})"
    if name in ALIASES:
        return f"{spot}: unknown key; did you mean {ALIASES[name]}?"
    candidates = [k.name for k in KEYS if level in k.levels] + (["general", "datasets"] if level == "top" else [])
    if level == DATASET:
        candidates.append("subsets")
    close = closest(name, candidates)
    hint = f"; did you mean {close}?" if close else ""
    return f"{spot}: unknown key{hint}"


def _level_name(level: str) -> str:
    return {"top": "the top level", GENERAL: "[general]", DATASET: "[[datasets]]",
            SUBSET: "[[datasets.subsets]]"}[level]
