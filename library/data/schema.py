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

from dataclasses import dataclass
from typing import Any

GENERAL, DATASET, SUBSET = "general", "dataset", "subset"
DREAMBOOTH, FINETUNE, CONTROL = "dreambooth", "finetune", "control"
ALL_STYLES = frozenset({DREAMBOOTH, FINETUNE, CONTROL})

# Pillow filters behind kohya's resize_interpolation names ("area" is Pillow's BOX filter).
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # bool | int | float | str | resolution | float_pair | dict | path
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
    _k("is_reg", "bool", _S, False, cli=None, styles=frozenset({DREAMBOOTH})),
    _k("alpha_mask", "bool", _S, False, styles=frozenset({DREAMBOOTH, FINETUNE})),
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
