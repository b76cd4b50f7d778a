"""Dataset TOML/JSON config: schema check, kohya's precedence, and the resolved frozen config.

`load_dataset_config(path, flags)` reads a kohya-style `data.toml` and returns a
`ResolvedDatasetConfig`, or raises one `UserError` listing every problem found, one line each
("<file>: datasets[0].subsets[1].num_repeat: unknown key; did you mean num_repeats?").

Precedence for every value (kohya's BlueprintGenerator): subset -> dataset -> general -> CLI -> default,
where the CLI level (`DatasetFlags.level`) holds only the flags the user actually typed, so an argparse
default never masks a TOML value and a TOML `false`/`0` always wins over the CLI. `DatasetFlags` is built
once, by the config builder (library/train/config.py) through `dataset_flags`; nothing past it sees a
raw command-line value.

Nothing here opens an image or a model: path checks only stat and list directories, which is what
`--validate_config` needs.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from library.data import schema as S
from library.data.degrade import DegradationConfig, parse_cli_degradation, parse_degradation
from library.data.images import list_images
from library.data.schema import (CONTROL, DATASET, DREAMBOOTH, FINETUNE, FLUX_MULTIPLE, GENERAL, SUBSET, Key,
                                 parse_value, show, unknown_key_error)
from library.errors import UserError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SubsetConfig:
    image_dir: Path | None
    metadata_file: Path | None
    conditioning_data_dir: Path | None
    is_reg: bool
    alpha_mask: bool
    num_repeats: int
    class_tokens: str | None
    caption_extension: str
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str
    secondary_separator: str | None
    shuffle_caption: bool
    caption_prefix: str | None
    caption_suffix: str | None
    enable_wildcard: bool
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    token_warmup_min: int
    token_warmup_step: float
    flip_aug: bool
    random_crop: bool
    color_aug: bool
    face_crop_aug_range: tuple[float, float] | None
    resize_interpolation: str | None
    cache_info: bool
    custom_attributes: dict[str, Any] | None = field(default=None, hash=False)
    degradation: DegradationConfig | None = None  # ours: the control image is made from the image
    before_dir: Path | None = None  # our extension: "before" images paired with image_dir's (library/data/pairs.py)


@dataclass(frozen=True)
class DatasetConfig:
    style: str  # dreambooth | finetune | control
    resolution: tuple[int, int]  # (W, H)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    network_multiplier: float
    validation_split: float
    validation_seed: int | None
    resize_interpolation: str | None
    subsets: tuple[SubsetConfig, ...]


@dataclass(frozen=True)
class ResolvedDatasetConfig:
    path: Path
    datasets: tuple[DatasetConfig, ...]
    masked_loss: bool = False  # conditioning images are loss masks (kohya) instead of Kontext references
    pair_side: str = "after"  # subsets with before_dir train on their "after" (image_dir) or "before" images
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)  # "datasets[0].x" -> level
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- reading

def read_document(path: Path) -> dict[str, Any]:
    """Parse TOML (or JSON, as kohya allows); syntax errors name the line and column."""
    if not path.exists():
        raise UserError(f"{path}: dataset config not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .toml file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}") from None
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            # (no kohya file was found that toml 0.10 reads and tomllib rejects; toml 0.10 reads some garbage as {})
            raise UserError(f"{path}:{_toml_position(e)}: TOML syntax error: {_toml_message(e)}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a table with [general] and [[datasets]] at the top level")
    return doc


def _toml_position(e: tomllib.TOMLDecodeError) -> str:
    line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
    if line is None:  # Python 3.11 only puts "(at line L, column C)" in the message
        m = re.search(r"at line (\d+), column (\d+)", str(e))
        line, col = (m.group(1), m.group(2)) if m else ("?", "?")
    return f"{line}:{col}"


def _toml_message(e: tomllib.TOMLDecodeError) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.split(" (at line")[0]


# ---------------------------------------------------------------------------------------------- structure

def _parse_table(table: Any, level: str, where: str, errors: list[str]) -> dict[str, Any]:
    """Type-check every key of one table; unknown keys and bad values go to `errors`."""
    if not isinstance(table, dict):
        errors.append(f"{where}: expected a table, got {show(table)}")
        return {}
    out: dict[str, Any] = {}
    for name, raw in table.items():
        if name == "subsets" and level == DATASET:
            continue
        key = S.KEY_BY_NAME.get(name)
        if key is None or level not in key.levels:
            errors.append(unknown_key_error(where, name, level))
            continue
        if key.kind == "degradation":  # a table of its own, with its own key paths in the messages
            value, errs = parse_degradation(raw, f"{where}.{name}")
            errors.extend(errs)
            if value is not None:
                out[name] = value
            continue
        value, err = parse_value(key, raw)
        if err:
            errors.append(f"{where}.{name}: {err}")
        else:
            out[name] = value
    return out


def _dataset_style(subsets: list[dict[str, Any]], where: str, errors: list[str]) -> str:
    """kohya's rule: all subsets with conditioning_data_dir -> control, all with metadata_file -> fine-tuning."""
    cond = [("conditioning_data_dir" in s) for s in subsets]
    meta = [("metadata_file" in s) for s in subsets]
    if subsets and all(cond):
        return CONTROL
    if any(cond):
        errors.append(f"{where}: control-image subsets (conditioning_data_dir) and other subsets cannot be mixed "
                      "in one dataset; put them in separate [[datasets]]")
        return CONTROL
    if subsets and all(meta):
        return FINETUNE
    if any(meta):
        errors.append(f"{where}: DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file) cannot be "
                      "mixed in one dataset; put them in separate [[datasets]]")
        return FINETUNE
    return DREAMBOOTH


def _check_style(values: dict[str, Any], style: str, where: str, errors: list[str], subset: bool) -> None:
    for name in values:
        key = S.KEY_BY_NAME[name]
        if style not in key.styles:
            errors.append(f"{where}.{name}: not allowed in a {style} {'subset' if subset else 'dataset'} "
                          f"(only in {', '.join(sorted(key.styles))})")
    if subset:
        for key in S.SUBSET_KEYS:
            if style in key.required and key.name not in values:
                errors.append(f"{where}: {key.name} is required in a {style} subset")


@dataclass(frozen=True)
class DatasetFlags:
    """The command line's part of the dataset config, parsed and typed (see `dataset_flags`)."""

    # The CLI level of the precedence chain: schema key -> value checked by its `Key` (only the flags the user
    # typed, under their TOML names: --train_batch_size fills "batch_size"), e.g. (("resolution", (512, 768)),).
    level: tuple[tuple[str, Any], ...] = ()
    cache_latents: bool = False  # --cache_latents (or implied by --cache_latents_to_disk): fixed crop and colours
    masked_loss: bool = False  # --masked_loss: conditioning images are loss masks, not Kontext references
    degradation: DegradationConfig | None = None  # --degradation_*: the control image of every clean subset


def dataset_flags(given: Mapping[str, Any]) -> DatasetFlags:
    """The dataset flags the user gave {kohya flag name: value}, implied ones already resolved by the config
    builder (--caption_extention filled caption_extension, --cache_latents_to_disk set cache_latents), checked
    and typed once; raises one UserError naming every bad flag ("--resolution: expected ...")."""
    errors: list[str] = []
    level: dict[str, Any] = {}
    for key in S.KEYS:
        if key.cli is None or given.get(key.cli) is None:
            continue
        value, err = parse_value(key, given[key.cli], from_cli=True)
        if err:
            errors.append(f"--{key.cli}: {err}")
        else:
            level[key.name] = value
    degradation, errs = parse_cli_degradation(dict(given))
    errors.extend(errs)
    if errors:
        raise UserError("\n".join(errors))
    return DatasetFlags(tuple(level.items()), bool(given.get("cache_latents")), bool(given.get("masked_loss")),
                        degradation)


def _resolve_path(raw: str, config_dir: Path) -> Path:
    """kohya resolves relative paths against the working directory; we also try the config's folder."""
    p = Path(raw).expanduser()
    if p.is_absolute() or p.exists() or not (config_dir / p).exists():
        return p
    return config_dir / p


# ---------------------------------------------------------------------------------------------- resolving

def _pick(key: Key, chain: list[tuple[str, dict[str, Any]]]) -> tuple[Any, str]:
    for level, values in chain:
        if key.name in values:
            return values[key.name], level
    return key.default, "default"


def _resolve_subset(raw: dict[str, Any], chain: list[tuple[str, dict[str, Any]]], style: str, where: str,
                    config_dir: Path, sources: dict[str, str]) -> SubsetConfig:
    values: dict[str, Any] = {}
    for key in S.SUBSET_KEYS:
        if style not in key.styles:  # e.g. caption_extension for a fine-tuning subset: not inherited
            values[key.name], sources[f"{where}.{key.name}"] = key.default, "n/a"
            continue
        value, src = _pick(key, [("subset", raw)] + chain)
        if key.kind == "path" and value is not None:
            value = _resolve_path(value, config_dir)
        values[key.name], sources[f"{where}.{key.name}"] = value, src
    return SubsetConfig(**values)


def _bucket_checks(ds: dict[str, Any], where: str, errors: list[str], warnings: list[str]) -> None:
    steps, res = ds["bucket_reso_steps"], ds["resolution"]
    if steps % FLUX_MULTIPLE:
        errors.append(f"{where}.bucket_reso_steps: must be a multiple of {FLUX_MULTIPLE} for FLUX, got {steps}")
        return
    if res is None:
        return
    if not ds["enable_bucket"]:
        if res[0] % FLUX_MULTIPLE or res[1] % FLUX_MULTIPLE:
            errors.append(f"{where}.resolution: {res[0]}x{res[1]} must be a multiple of {FLUX_MULTIPLE} "
                          "without enable_bucket")
        return
    if ds["bucket_no_upscale"]:
        return  # kohya ignores min/max_bucket_reso then
    lo, hi = ds["min_bucket_reso"], ds["max_bucket_reso"]
    if lo % steps or hi % steps:  # kohya rounds min down and max up to the step, with a warning
        ds["min_bucket_reso"], ds["max_bucket_reso"] = lo - lo % steps, hi + (-hi) % steps
        warnings.append(f"{where}: min/max_bucket_reso {lo}/{hi} rounded to multiples of bucket_reso_steps "
                        f"({ds['min_bucket_reso']}/{ds['max_bucket_reso']})")
        lo, hi = ds["min_bucket_reso"], ds["max_bucket_reso"]
    if lo > hi:
        errors.append(f"{where}: min_bucket_reso {lo} is larger than max_bucket_reso {hi}")
    elif min(res) < lo:
        errors.append(f"{where}.resolution: {res[0]}x{res[1]} is below min_bucket_reso {lo}; "
                      "lower min_bucket_reso or raise resolution")
    elif max(res) > hi:
        errors.append(f"{where}.resolution: {res[0]}x{res[1]} is above max_bucket_reso {hi}; "
                      "raise max_bucket_reso or lower resolution")


def _check_subset_paths(sub: SubsetConfig, style: str, where: str, errors: list[str]) -> None:
    for name in ("image_dir", "conditioning_data_dir", "before_dir"):
        p = getattr(sub, name)
        if p is not None and not p.is_dir():
            errors.append(f"{where}.{name}: {p}: {'is not a directory' if p.exists() else 'no such directory'}")
    if sub.metadata_file is not None and not sub.metadata_file.is_file():
        errors.append(f"{where}.metadata_file: {sub.metadata_file}: no such file")
    if style != FINETUNE and sub.image_dir is not None and sub.image_dir.is_dir() and not list_images(sub.image_dir):
        errors.append(f"{where}.image_dir: {sub.image_dir}: contains no images "
                      f"({', '.join(S.IMAGE_EXTENSIONS[:5])}, ...)")


def _resolve_dataset(i: int, raw: Any, general: dict[str, Any], cli: dict[str, Any], ctx: "_Ctx"
                     ) -> DatasetConfig | None:
    where = f"datasets[{i}]"
    ds_vals = _parse_table(raw, DATASET, where, ctx.errors)
    raw_subsets = raw.get("subsets", []) if isinstance(raw, dict) else []
    if not isinstance(raw_subsets, list):
        ctx.errors.append(f"{where}.subsets: expected [[datasets.subsets]] tables, got {show(raw_subsets)}")
        raw_subsets = []
    subs = [_parse_table(s, SUBSET, f"{where}.subsets[{j}]", ctx.errors) for j, s in enumerate(raw_subsets)]
    for j, sv in enumerate(subs):
        if "degradation" in sv and "conditioning_data_dir" in sv:
            ctx.errors.append(f"{where}.subsets[{j}].degradation: cannot be combined with conditioning_data_dir "
                              "(the control image is made from the image); remove one of them")
            del sv["degradation"]
    if not subs:
        ctx.errors.append(f"{where}: has no [[datasets.subsets]]; add one with image_dir = \"...\"")
        return None
    style = _dataset_style(subs, where, ctx.errors)
    _check_style(ds_vals, style, where, ctx.errors, subset=False)
    chain = [("dataset", ds_vals), ("general", general), ("cli", cli)]
    resolved: dict[str, Any] = {}
    for key in S.DATASET_KEYS:
        resolved[key.name], ctx.sources[f"{where}.{key.name}"] = _pick(key, chain)
    if resolved["resolution"] is None:
        ctx.errors.append(f"{where}: resolution is not set; set it in [general] or [[datasets]] "
                          "(e.g. resolution = 1024) or pass --resolution")
    _bucket_checks(resolved, where, ctx.errors, ctx.warnings)
    subsets: list[SubsetConfig] = []
    seen: set[tuple] = set()
    for j, sv in enumerate(subs):
        swhere = f"{where}.subsets[{j}]"
        _check_style(sv, style, swhere, ctx.errors, subset=True)
        ssrc: dict[str, str] = {}
        sub = _resolve_subset(sv, chain, style, swhere, ctx.config_dir, ssrc)
        if sub.degradation is None and ctx.cli_degradation is not None and style != CONTROL:
            sub = replace(sub, degradation=ctx.cli_degradation)  # --degradation_types: every clean subset
            ssrc[f"{swhere}.degradation"] = "cli"
        if ctx.check_paths:
            _check_subset_paths(sub, style, swhere, ctx.errors)
        _check_cache_conflicts(sub, swhere, ctx)
        ident = (sub.image_dir, sub.metadata_file, sub.conditioning_data_dir)
        if sub.num_repeats == 0:
            ctx.warnings.append(f"{swhere}: num_repeats = 0, subset skipped")
        elif ident in seen:  # kohya skips a repeated image_dir / metadata_file within one dataset
            ctx.warnings.append(f"{swhere}: same source as an earlier subset of {where}, skipped")
        else:
            seen.add(ident)  # sources are keyed by the index among the kept subsets, as printed
            kept = f"{where}.subsets[{len(subsets)}]"
            ctx.sources.update({kept + k[len(swhere):]: v for k, v in ssrc.items()})
            subsets.append(sub)
    if len({s.degradation is None for s in subsets}) > 1:
        ctx.errors.append(f"{where}: subsets with a degradation table and subsets without cannot be mixed in one "
                          "dataset (a batch has control images for all or none); put them in separate [[datasets]]")
    return DatasetConfig(style=style, subsets=tuple(subsets), **resolved)


def _check_cache_conflicts(sub: SubsetConfig, where: str, ctx: "_Ctx") -> None:
    # A cached latent fixes the crop and the colours; kohya asserts, we name the key and the flag.
    if not ctx.cache_latents:
        return
    for name in ("random_crop", "color_aug"):
        if getattr(sub, name):
            ctx.errors.append(f"{where}.{name}: cannot be combined with --cache_latents (cached latents fix the "
                              f"image); set {name} = false or drop --cache_latents")
    if sub.face_crop_aug_range is not None:
        ctx.errors.append(f"{where}.face_crop_aug_range: cannot be combined with --cache_latents")


@dataclass
class _Ctx:
    config_dir: Path
    check_paths: bool
    cache_latents: bool
    cli_degradation: DegradationConfig | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


def load_dataset_config(path: str | Path, flags: DatasetFlags | None = None,
                        check_paths: bool = True) -> ResolvedDatasetConfig:
    """Read, check and resolve a dataset config; raises one UserError listing every problem.

    `flags` is the command line's part (`dataset_flags`; none given: TOML and defaults only).
    `check_paths` stats directories and lists their files (no image is opened).
    """
    path = Path(path)
    flags = flags or DatasetFlags()
    doc = read_document(path)
    ctx = _Ctx(config_dir=path.parent, check_paths=check_paths, cache_latents=flags.cache_latents,
               cli_degradation=flags.degradation)
    for name in doc:
        if name not in ("general", "datasets"):
            ctx.errors.append(unknown_key_error("", name, "top"))
    general = _parse_table(doc.get("general", {}), GENERAL, "general", ctx.errors)
    cli = dict(flags.level)
    raw_datasets = doc.get("datasets", [])
    if not isinstance(raw_datasets, list):
        ctx.errors.append(f"datasets: expected [[datasets]] tables, got {show(raw_datasets)}")
        raw_datasets = []
    if not raw_datasets:
        ctx.errors.append("datasets: no [[datasets]] defined; add [[datasets]] with at least one "
                          "[[datasets.subsets]]")
    datasets = [_resolve_dataset(i, d, general, cli, ctx) for i, d in enumerate(raw_datasets)]
    if raw_datasets and not ctx.errors and not any(d is not None and d.subsets for d in datasets):
        # kohya skips num_repeats = 0 subsets; with none left, training would have nothing to step on
        ctx.errors.append("datasets: no subset is left to train (every subset has num_repeats = 0 or repeats "
                          "an earlier source); set num_repeats >= 1")
    if ctx.cli_degradation is not None and not any(ctx.sources.get(k) == "cli" for k in ctx.sources
                                                   if k.endswith(".degradation")):
        ctx.warnings.append("--degradation_types: no subset takes it (each has conditioning_data_dir or a "
                            "degradation table of its own)")
    if ctx.errors:
        raise UserError("\n".join(e if e.startswith(("--", str(path))) else f"{path}: {e}" for e in ctx.errors))
    for w in ctx.warnings:
        log.warning("%s: %s", path, w)
    return ResolvedDatasetConfig(path=path, datasets=tuple(d for d in datasets if d is not None),
                                 masked_loss=flags.masked_loss, sources=ctx.sources,
                                 warnings=tuple(ctx.warnings))


# ---------------------------------------------------------------------------------------------- printing

def _toml_value(v: Any) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, Path):
        return json.dumps(str(v))
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, DegradationConfig):
        return _toml_value({"ops": v.ops, "variants": v.variants, **({"seed": v.seed} if v.seed is not None else {}),
                            **v.ranges()})
    return json.dumps(v)


def format_resolved(cfg: ResolvedDatasetConfig) -> str:
    """Every resolved value of every dataset and subset, TOML-like, with the level it came from."""
    lines = [f"# dataset config {cfg.path} (values after subset > dataset > general > CLI > default)"]
    if cfg.masked_loss:
        lines.append("# --masked_loss: conditioning images are loss masks")
    for w in cfg.warnings:
        lines.append(f"# warning: {w}")
    for i, ds in enumerate(cfg.datasets):
        lines += ["", f"[[datasets]]  # {i}: {ds.style}, {len(ds.subsets)} subset(s)"]
        for f in fields(DatasetConfig):
            if f.name not in ("subsets", "style"):
                lines.append(_line(f.name, getattr(ds, f.name), cfg.sources.get(f"datasets[{i}].{f.name}", ""), 2))
        for j, sub in enumerate(ds.subsets):
            lines += ["", f"  [[datasets.subsets]]  # {i}.{j}"]
            for f in fields(SubsetConfig):
                src = cfg.sources.get(f"datasets[{i}].subsets[{j}].{f.name}", "")
                if src != "n/a":
                    lines.append(_line(f.name, getattr(sub, f.name), src, 4))
    return "\n".join(lines)


def _line(name: str, value: Any, source: str, indent: int) -> str:
    text = f"{' ' * indent}{name} = {_toml_value(value)}"
    return f"{text:<60} # {source}"
