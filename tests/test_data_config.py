"""Dataset TOML schema: every key at every level, kohya's precedence, and every kind of error at once."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import schema as S
from library.data.config import DatasetConfig, SubsetConfig, dataset_flags, format_resolved, load_dataset_config
from library.data.degrade import DegradationConfig
from library.errors import UserError, run_main

LEVELS = (S.GENERAL, S.DATASET, S.SUBSET)

# A valid non-default value for every key kind (special-cased where a range or format applies).
SAMPLE = {
    "resolution": ([768, 512], (768, 512)), "batch_size": (3, 3), "min_bucket_reso": (128, 128),
    "max_bucket_reso": (2048, 2048), "bucket_reso_steps": (32, 32), "validation_split": (0.25, 0.25),
    "validation_seed": (7, 7), "network_multiplier": (0.5, 0.5), "resize_interpolation": ("bicubic", "bicubic"),
    "num_repeats": (4, 4), "face_crop_aug_range": ([2.0, 4.0], (2.0, 4.0)), "caption_separator": (";", ";"),
    "keep_tokens": (2, 2), "keep_tokens_separator": ("|||", "|||"), "secondary_separator": (";;;", ";;;"),
    "caption_prefix": ("pre", "pre"), "caption_suffix": ("suf", "suf"), "caption_dropout_rate": (0.1, 0.1),
    "caption_dropout_every_n_epochs": (3, 3), "caption_tag_dropout_rate": (0.2, 0.2),
    "token_warmup_min": (2, 2), "token_warmup_step": (5, 5.0), "custom_attributes": ({"a": 1}, {"a": 1}),
    "caption_extension": ("txt", ".txt"), "class_tokens": ("sks dog", "sks dog"),
    "degradation": ({"ops": ["blur"], "blur_sigma": [1.0, 2.0]}, DegradationConfig(("blur",), blur_sigma=(1.0, 2.0))),
}


def _sample(key: S.Key):
    if key.name in SAMPLE:
        return SAMPLE[key.name]
    assert key.kind == "bool", key.name
    return True, True


def _images(folder: Path, n: int = 2, size=(64, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"img{i}.png")
    return folder


def _toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def _write(tmp_path: Path, general: dict, dataset: dict, subsets: list[dict], name="c.toml") -> Path:
    lines = ["[general]"] + [f"{k} = {_toml_value(v)}" for k, v in general.items()]
    lines += ["[[datasets]]"] + [f"{k} = {_toml_value(v)}" for k, v in dataset.items()]
    for s in subsets:
        lines += ["[[datasets.subsets]]"] + [f"{k} = {_toml_value(v)}" for k, v in s.items()]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture()
def imgdir(tmp_path: Path) -> Path:
    return _images(tmp_path / "imgs")


def _errors(excinfo) -> list[str]:
    return str(excinfo.value).splitlines()


# ------------------------------------------------------------------------------------------ key levels

NON_PATH = [k for k in S.KEYS if k.kind != "path" and k.name not in ("is_reg", "alpha_mask")]


@pytest.mark.parametrize("key", NON_PATH, ids=lambda k: k.name)
@pytest.mark.parametrize("level", LEVELS)
def test_every_key_at_every_level(tmp_path, imgdir, key, level):
    raw, expected = _sample(key)
    blocks = {S.GENERAL: {"resolution": 1024}, S.DATASET: {}, S.SUBSET: {"image_dir": str(imgdir)}}
    if key.name == "resolution":  # keep the bucket limits consistent with a smaller resolution
        blocks[S.GENERAL] = {}
    if key.name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        blocks[S.GENERAL]["enable_bucket"] = True
    blocks[level][key.name] = raw
    path = _write(tmp_path, blocks[S.GENERAL], blocks[S.DATASET], [blocks[S.SUBSET]])
    if level not in key.levels:
        with pytest.raises(UserError) as e:
            load_dataset_config(path)
        spot = {S.GENERAL: "general", S.DATASET: "datasets[0]", S.SUBSET: "datasets[0].subsets[0]"}[level]
        assert f"{spot}.{key.name}: not allowed in" in str(e.value)
        return
    cfg = load_dataset_config(path)
    ds = cfg.datasets[0]
    holder = ds if SUBSET_ONLY_OR_DS(key) else ds.subsets[0]
    assert getattr(holder, key.name) == expected
    src_key = f"datasets[0].{key.name}" if holder is ds else f"datasets[0].subsets[0].{key.name}"
    assert cfg.sources[src_key] == {S.GENERAL: "general", S.DATASET: "dataset", S.SUBSET: "subset"}[level]


def SUBSET_ONLY_OR_DS(key: S.Key) -> bool:
    return S.SUBSET not in key.levels


@pytest.mark.parametrize("name", ["is_reg", "alpha_mask", "image_dir", "metadata_file", "conditioning_data_dir"])
@pytest.mark.parametrize("level", [S.GENERAL, S.DATASET])
def test_subset_only_keys_rejected_above_subsets(tmp_path, imgdir, name, level):
    general = {"resolution": 512}
    dataset = {}
    (general if level == S.GENERAL else dataset)[name] = True if name in ("is_reg", "alpha_mask") else str(imgdir)
    with pytest.raises(UserError) as e:
        load_dataset_config(_write(tmp_path, general, dataset, [{"image_dir": str(imgdir)}]))
    where = "general" if level == S.GENERAL else "datasets[0]"
    assert f"{where}.{name}: not allowed in" in str(e.value) and "[[datasets.subsets]]" in str(e.value)


def test_style_specific_keys(tmp_path, imgdir):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"img0.png": {"caption": "a"}}))
    cond = _images(tmp_path / "cond")
    cfg = load_dataset_config(_write(tmp_path, {"resolution": 512, "class_tokens": "tok", "caption_extension": ".txt"},
                                     {}, [{"image_dir": str(imgdir), "metadata_file": str(meta), "alpha_mask": True}]))
    sub = cfg.datasets[0].subsets[0]
    assert cfg.datasets[0].style == "finetune" and sub.alpha_mask
    assert sub.class_tokens is None and sub.caption_extension == ".caption"  # [general] keys not inherited
    # fine-tuning subsets reject DreamBooth-only keys; control subsets reject is_reg and alpha_mask
    for extra, style in (({"caption_extension": ".txt"}, "finetune"), ({"is_reg": True}, "finetune")):
        with pytest.raises(UserError) as e:
            load_dataset_config(_write(tmp_path, {"resolution": 512}, {},
                                       [{"image_dir": str(imgdir), "metadata_file": str(meta), **extra}]))
        assert f"not allowed in a {style} subset" in str(e.value)
    for extra in ({"is_reg": True}, {"alpha_mask": True}):
        with pytest.raises(UserError) as e:
            load_dataset_config(_write(tmp_path, {"resolution": 512}, {},
                                       [{"image_dir": str(imgdir), "conditioning_data_dir": str(cond), **extra}]))
        assert "not allowed in a control subset" in str(e.value)
    cfg = load_dataset_config(_write(tmp_path, {"resolution": 512}, {},
                                     [{"image_dir": str(imgdir), "conditioning_data_dir": str(cond)}]))
    assert cfg.datasets[0].style == "control"
    with pytest.raises(UserError) as e:  # class_tokens at dataset level of a fine-tuning dataset
        load_dataset_config(_write(tmp_path, {"resolution": 512}, {"class_tokens": "x"},
                                   [{"metadata_file": str(meta), "image_dir": str(imgdir)}]))
    assert "datasets[0].class_tokens: not allowed in a finetune dataset" in str(e.value)


def test_mixed_styles_and_required_keys(tmp_path, imgdir):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    with pytest.raises(UserError) as e:
        load_dataset_config(_write(tmp_path, {"resolution": 512}, {},
                                   [{"image_dir": str(imgdir)}, {"metadata_file": str(meta)}, {"num_repeats": 2}]))
    msg = str(e.value)
    assert "cannot be mixed in one dataset" in msg
    with pytest.raises(UserError) as e:
        load_dataset_config(_write(tmp_path, {"resolution": 512}, {}, [{"num_repeats": 2}]))
    assert "datasets[0].subsets[0]: image_dir is required in a dreambooth subset" in str(e.value)


# ------------------------------------------------------------------------------------------ precedence

@pytest.mark.parametrize("where,expected,source", [
    ("subset", 5, "subset"), ("dataset", 4, "dataset"), ("general", 3, "general"), ("cli", 2, "cli"),
    ("none", 1, "default"),
])
def test_precedence_chain(tmp_path, imgdir, where, expected, source):
    levels = ["subset", "dataset", "general", "cli"]
    present = levels[levels.index(where):] if where != "none" else []
    general = {"resolution": 512, **({"num_repeats": 3} if "general" in present else {})}
    dataset = {"num_repeats": 4} if "dataset" in present else {}
    sub = {"image_dir": str(imgdir), **({"num_repeats": 5} if "subset" in present else {})}
    cli = {"dataset_repeats": 2} if "cli" in present else {}
    cfg = load_dataset_config(_write(tmp_path, general, dataset, [sub]), dataset_flags(cli))
    assert cfg.datasets[0].subsets[0].num_repeats == expected
    assert cfg.sources["datasets[0].subsets[0].num_repeats"] == source


def test_toml_false_beats_cli_and_cli_fills_only_given(tmp_path, imgdir):
    path = _write(tmp_path, {"resolution": 512}, {"batch_size": 2},
                  [{"image_dir": str(imgdir), "flip_aug": False}, {"image_dir": str(_images(tmp_path / "b"))}])
    cfg = load_dataset_config(path, dataset_flags({"flip_aug": True, "train_batch_size": 8, "caption_extension": "txt",
                                     "resolution": "1024,768", "unrelated_flag": 3}))
    ds = cfg.datasets[0]
    assert ds.batch_size == 2 and ds.resolution == (512, 512)  # TOML wins over the CLI
    assert ds.subsets[0].flip_aug is False and ds.subsets[1].flip_aug is True  # false in TOML is a value
    assert ds.subsets[0].caption_extension == ".txt"  # a CLI extension without its dot gets one
    cfg = load_dataset_config(_write(tmp_path, {}, {}, [{"image_dir": str(imgdir)}]),
                              dataset_flags({"resolution": "1024,768"}))
    assert cfg.datasets[0].resolution == (1024, 768)
    assert cfg.datasets[0].subsets[0].caption_extension == ".caption"  # kohya's effective default


@pytest.mark.parametrize("raw,expected", [(512, (512, 512)), ([768, 512], (768, 512)), ("768,512", (768, 512)),
                                          ("1024", (1024, 1024))])
def test_resolution_forms(tmp_path, imgdir, raw, expected):
    cfg = load_dataset_config(_write(tmp_path, {"resolution": raw}, {}, [{"image_dir": str(imgdir)}]))
    assert cfg.datasets[0].resolution == expected


def test_relative_paths_and_json(tmp_path, imgdir, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder: falls back to it
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"general": {"resolution": 512},
                                "datasets": [{"subsets": [{"image_dir": "imgs", "num_repeats": 2}]}]}))
    cfg = load_dataset_config(path)
    assert cfg.datasets[0].subsets[0].image_dir == tmp_path / "imgs"


# ------------------------------------------------------------------------------------------ errors

def test_toml_syntax_error_line_and_column(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[general]\nresolution = 512\nflip_aug = tru\n")
    with pytest.raises(UserError) as e:
        load_dataset_config(p)
    assert str(e.value).startswith(f"{p}:3:") and "TOML syntax error" in str(e.value)


def test_all_errors_at_once_one_line_each(tmp_path, imgdir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    path = _write(tmp_path, {"resolution": 512, "flip_aug": "yes", "batch_sise": 2},
                  {"caption_dropout_rate": 1.5, "validation_split": 0.2},
                  [{"image_dir": str(imgdir), "num_repeat": 3},
                   {"image_dir": str(tmp_path / "missing")},
                   {"image_dir": str(empty), "keep_tokens": -1, "batch_size": 2, "validation_split": 0.1}])
    with pytest.raises(UserError) as e:
        load_dataset_config(path)
    lines = _errors(e)
    expect = [
        "general.flip_aug: expected true or false",
        "general.batch_sise: unknown key; did you mean batch_size?",
        "datasets[0].caption_dropout_rate: must be <= 1",
        "datasets[0].subsets[0].num_repeat: unknown key; did you mean num_repeats?",
        "datasets[0].subsets[1].image_dir: " + str(tmp_path / "missing") + ": no such directory",
        "datasets[0].subsets[2].image_dir: " + str(empty) + ": contains no images",
        "datasets[0].subsets[2].keep_tokens: must be >= 0",
        "datasets[0].subsets[2].batch_size: not allowed in [[datasets.subsets]]; set it in [general] or [[datasets]]",
        "datasets[0].subsets[2].validation_split: not allowed in [[datasets.subsets]]",
    ]
    for want in expect:
        assert sum(want in ln for ln in lines) == 1, (want, lines)
    assert all(ln.startswith(f"{path}: ") for ln in lines)
    assert len(lines) == len(expect)


@pytest.mark.parametrize("snippet,message", [
    ({"num_repeats": 2.0}, "num_repeats: expected an integer, got 2.0"),
    ({"keep_tokens": True}, "keep_tokens: expected an integer, got true"),
    ({"caption_prefix": 3}, "caption_prefix: expected a string, got 3"),
    ({"face_crop_aug_range": [3.0, 1.0]}, "face_crop_aug_range: expected 0 < low <= high"),
    ({"resize_interpolation": "spline"}, "resize_interpolation: unknown interpolation 'spline'"),
    ({"custom_attributes": 3}, "custom_attributes: expected a table"),
])
def test_wrong_types(tmp_path, imgdir, snippet, message):
    with pytest.raises(UserError) as e:
        load_dataset_config(_write(tmp_path, {"resolution": 512}, {}, [{"image_dir": str(imgdir), **snippet}]))
    assert f"datasets[0].subsets[0].{message}" in str(e.value)


@pytest.mark.parametrize("general,message", [
    ({}, "datasets[0]: resolution is not set"),
    ({"resolution": "big"}, "general.resolution: expected N, [width, height]"),
    ({"resolution": [512, 512, 1]}, "general.resolution: expected N"),
    ({"resolution": 1000}, "resolution: 1000x1000 must be a multiple of 16"),
    ({"resolution": 512, "bucket_reso_steps": 24}, "bucket_reso_steps: must be a multiple of 16"),
    ({"resolution": 2048, "enable_bucket": True}, "above max_bucket_reso 1024"),
    ({"resolution": 128, "enable_bucket": True}, "below min_bucket_reso 256"),
    ({"resolution": 512, "validation_split": 1.0}, "validation_split: must be < 1"),
    ({"resolution": 512, "batch_size": 0}, "batch_size: must be >= 1"),
])
def test_dataset_level_errors(tmp_path, imgdir, general, message):
    with pytest.raises(UserError) as e:
        load_dataset_config(_write(tmp_path, general, {}, [{"image_dir": str(imgdir)}]))
    assert message in str(e.value)


def test_top_level_and_cli_only_keys(tmp_path, imgdir):
    p = tmp_path / "c.toml"
    p.write_text(f'resolution = 512\n[general]\nprior_loss_weight = 1.0\ntrain_batch_size = 2\n'
                 f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{imgdir}"\n')
    with pytest.raises(UserError) as e:
        load_dataset_config(p, dataset_flags({"resolution": 512}))
    msg = str(e.value)
    assert "resolution: not allowed in the top level; set it in [general] or [[datasets]]" in msg
    assert "general.prior_loss_weight: only settable on the command line (--prior_loss_weight)" in msg
    assert "general.train_batch_size: unknown key; did you mean batch_size?" in msg
    p.write_text("[general]\nresolution = 512\n")
    with pytest.raises(UserError, match="no \\[\\[datasets\\]\\] defined"):
        load_dataset_config(p)
    with pytest.raises(UserError, match="--resolution: expected N"):
        load_dataset_config(_write(tmp_path, {}, {}, [{"image_dir": str(imgdir)}]),
                            dataset_flags({"resolution": "a,b"}))
    with pytest.raises(UserError, match="dataset config not found"):
        load_dataset_config(tmp_path / "nope.toml")


def test_cache_conflicts_and_caption_randomness_allowed(tmp_path, imgdir):
    path = _write(tmp_path, {"resolution": 512, "shuffle_caption": True, "caption_dropout_rate": 0.1}, {},
                  [{"image_dir": str(imgdir), "random_crop": True}])
    with pytest.raises(UserError, match="random_crop: cannot be combined with --cache_latents"):
        load_dataset_config(path, dataset_flags({"cache_latents": True}))
    # kohya refuses TE caching with shuffle/dropout; we do not
    load_dataset_config(path, dataset_flags({"cache_text_encoder_outputs": True}))


def test_run_main_prints_errors_and_exits_2(tmp_path, imgdir, capsys):
    path = _write(tmp_path, {"resolution": 512, "flip_aug": 1}, {}, [{"image_dir": str(imgdir), "num_repeat": 1}])
    with pytest.raises(SystemExit) as e:
        run_main(lambda: load_dataset_config(path) and 0)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(ln.startswith("error: ") for ln in err)


def test_warnings_duplicates_zero_repeats_and_rounding(tmp_path, imgdir):
    other = _images(tmp_path / "other")
    cfg = load_dataset_config(_write(
        tmp_path, {"resolution": 512, "enable_bucket": True, "min_bucket_reso": 200, "max_bucket_reso": 1000}, {},
        [{"image_dir": str(imgdir)}, {"image_dir": str(imgdir)}, {"image_dir": str(other), "num_repeats": 0}]))
    ds = cfg.datasets[0]
    assert len(ds.subsets) == 1 and (ds.min_bucket_reso, ds.max_bucket_reso) == (192, 1024)
    assert len(cfg.warnings) == 3


def test_format_resolved_lists_every_value(tmp_path, imgdir):
    cfg = load_dataset_config(_write(tmp_path, {"resolution": 512, "flip_aug": True}, {"batch_size": 2},
                                     [{"image_dir": str(imgdir), "num_repeats": 3}]), dataset_flags({"keep_tokens": 1}))
    text = format_resolved(cfg)
    for f in list(DatasetConfig.__dataclass_fields__) + list(SubsetConfig.__dataclass_fields__):
        if f not in ("subsets", "style", "metadata_file", "conditioning_data_dir"):
            assert f"{f} = " in text, f
    assert "flip_aug = true" in text and "# general" in text.split("flip_aug = true")[1].splitlines()[0]
    assert "keep_tokens = 1" in text and "# cli" in text.split("keep_tokens = 1")[1].splitlines()[0]


def test_schema_matches_dataclasses():
    sub_fields = set(SubsetConfig.__dataclass_fields__)
    ds_fields = set(DatasetConfig.__dataclass_fields__) - {"subsets", "style"}
    assert {k.name for k in S.SUBSET_KEYS} == sub_fields
    assert {k.name for k in S.DATASET_KEYS} == ds_fields


def test_kohya_doc_examples(tmp_path, imgdir):
    """Files from kohya's docs: the string resolution is accepted here (kohya rejects it); the subset-level
    validation_split stays an error but says where it belongs; interpolation_type points to its real name."""
    cfg = load_dataset_config(_write(tmp_path, {"resolution": "1024,1024", "enable_bucket": True}, {},
                                     [{"image_dir": str(imgdir)}]))
    assert cfg.datasets[0].resolution == (1024, 1024)
    with pytest.raises(UserError) as e:
        load_dataset_config(_write(tmp_path, {"resolution": 1024, "interpolation_type": "bicubic"}, {},
                                   [{"image_dir": str(imgdir)}]))
    assert "general.interpolation_type: unknown key; did you mean resize_interpolation?" in str(e.value)


def test_validate_config_opens_no_image(tmp_path, imgdir, monkeypatch):
    """--validate_config reads the schema and lists folders only: opening an image fails this test."""
    import PIL.Image

    def refuse(*a, **k):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    cfg = load_dataset_config(_write(tmp_path, {"resolution": 512, "enable_bucket": True}, {},
                                     [{"image_dir": str(imgdir)}]))
    assert "image_dir" in format_resolved(cfg)


KOHYA_README_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{piyo}/piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def test_kohya_config_readme_example(tmp_path):
    """The main example of kohya's docs/config_README-en.md, paths replaced: resolves as its comments say."""
    dirs = {n: _images(tmp_path / n) for n in ("hoge", "fuga", "reg", "piyo")}
    (dirs["piyo"] / "piyo_md.json").write_text("{}")
    p = tmp_path / "kohya.toml"
    p.write_text(KOHYA_README_EXAMPLE.format(**{k: str(v) for k, v in dirs.items()}))
    db, ft = load_dataset_config(p).datasets
    assert (db.style, ft.style) == ("dreambooth", "finetune")
    assert [s.keep_tokens for s in db.subsets] == [2, 3, 1] and ft.subsets[0].keep_tokens == 1
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in db.subsets)
    assert (db.resolution, db.batch_size, ft.resolution, ft.batch_size) == ((512, 512), 4, (768, 768), 2)


# ---------------------------------------------------------------------------------------------- the CLI level

def test_dataset_flags_are_typed_once_by_the_config_builder():
    from library.train.cli import parse_args
    from library.train.config import build_config

    cfg = build_config(parse_args(["--resolution", "512,768", "--train_batch_size", "2", "--caption_extension", "txt",
                                   "--cache_latents_to_disk", "--degradation_types", "blur"]))
    flags = cfg.data.flags
    assert dict(flags.level) == {"resolution": (512, 768), "batch_size": 2, "caption_extension": ".txt"}
    assert flags.cache_latents and flags.degradation is not None and flags.degradation.ops == ("blur",)
    # a bad value is one error naming the flag, at the build (before any dataset file is read)
    with pytest.raises(UserError, match=r"^--resolution: expected N") as e:
        build_config(parse_args(["--resolution", "a,b", "--dataset_config", "/nonexistent.toml"]))
    assert len(str(e.value).splitlines()) == 1
    # the data layer resolves no alias: --caption_extention is the config builder's (once, in _resolve)
    assert dataset_flags({"caption_extention": ".a"}).level == ()
    assert build_config(parse_args(["--caption_extention", ".a"])).data.flags.level == (("caption_extension", ".a"),)


_BUILDER = "library/train/config.py"  # the one module that turns raw CLI values into DatasetFlags


def raw_cli_reads(path: str, source: str) -> list[str]:
    """Where a module passes raw command-line values to the data layer: a `cli_values` attribute, a call of
    `dataset_flags` outside the config builder, or a dict given to `load_dataset_config` as its flags."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "cli_values":
            out.append(f"{path}:{node.lineno}: .cli_values")
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "dataset_flags" and path != _BUILDER:
                out.append(f"{path}:{node.lineno}: dataset_flags() outside {_BUILDER}")
            flags = node.args[1:2] or [k.value for k in node.keywords if k.arg == "flags"]
            if name == "load_dataset_config" and flags and (isinstance(flags[0], ast.Dict) or (
                    isinstance(flags[0], ast.Call) and getattr(flags[0].func, "id", None) == "dict")):
                out.append(f"{path}:{node.lineno}: raw values given to load_dataset_config")
    return out


def test_no_module_past_the_config_builder_reads_raw_cli_values():
    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("library/**/*.py"), *root.glob("networks/**/*.py"), *root.glob("*.py")]
    found = [hit for f in files for hit in raw_cli_reads(str(f.relative_to(root)), f.read_text(encoding="utf-8"))]
    assert found == []
    # the negative control: each way raw values travelled before (library/train/preflight.py, setup.py, ...)
    bad = ("load_dataset_config(p, cfg.data.cli_values)\nload_dataset_config(p, {'resolution': 1})\n"
           "load_dataset_config(p, flags=dict(cli))\ndataset_flags({})\n")
    assert len(raw_cli_reads("library/train/setup.py", bad)) == 4
    assert raw_cli_reads(_BUILDER, "dataset_flags({})") == []
