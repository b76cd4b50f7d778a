"""Variant studies: train each `[[variant]]` of a STUDY.toml in turn, then render, score and report them
together (`flux_eval_lora.py study STUDY.toml`).

    [study]
    output_dir = "study_out"                # relative paths are relative to this file
    config_file = "train.toml"              # a kohya --config_file (optional)
    args = ["--pretrained_model_name_or_path", "flux1-dev.safetensors", ...]   # the base training flags
                                            # (the trainer runs in this file's folder)
    dataset_config = "data.toml"            # needed when variants override dataset keys

    [eval]                                  # flux_eval_lora.py render + score settings
    prompts = "prompts.json"
    strengths = [0.0, 1.0]
    seeds = [1, 2]
    width = 1024
    height = 1024
    clip_model = "models/clip-vit-large-patch14"   # optional: dino_model, reference_dir, class_token_map

    [[variant]]
    name = "rank4"
    network_dim = 4                         # a training flag
    dataset = { caption_extension = ".florence" }  # dataset TOML keys, set wherever the base sets them

Each variant trains into `<output_dir>/train/<name>/` with `--output_name <name> --save_state`. A variant
whose final `<name>.safetensors` exists is skipped; one with only `<name>…-state` folders (killed, or
stopped by SIGINT/SIGTERM, which save a state) resumes from the newest state. Rendering resumes too, so
rerunning a study after any interruption redoes nothing that finished.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml

from library.atomic import write_text_atomic
from library.errors import UserError, closest
from library.eval.prompts import load_eval_prompts, parse_class_token_map
from library.eval.render import RenderConfig, Renderer, find_loras, is_done, plan
from library.eval.report import write_report
from library.eval.score import ScoreConfig, score
from library.train.cli import FLAG_BY_NAME, read_config_file, suggest

REPO = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # no '_': names sit inside image names
STUDY_KEYS = {"output_dir", "config_file", "args", "dataset_config", "python"}
EVAL_KEYS = {"prompts", "strengths", "seeds", "width", "height", "steps", "guidance", "t5xxl_max_token_length",
             "dtype", "fp8", "device", "clip_model", "dino_model", "reference_dir", "class_token_map", "batch_size"}


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]  # extra training arguments
    dataset: dict  # dataset-key overrides


@dataclass(frozen=True)
class Study:
    path: Path
    output_dir: Path
    base_args: tuple[str, ...]
    dataset_config: Path | None
    eval: dict
    variants: tuple[Variant, ...]
    python: str = sys.executable


def _rel(root: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: expected a path string, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _flag_args(name: str, value: Any, where: str) -> list[str]:
    if name not in FLAG_BY_NAME:
        raise UserError(f"{where}: unknown training flag or key {name!r}{suggest(name)} (dataset keys go in "
                        "variant.dataset)")
    if isinstance(value, bool):
        if FLAG_BY_NAME[name].kind != "flag":
            raise UserError(f"{where}: {name}: expected a value, got {value!r}")
        return [f"--{name}"] if value else []
    values = value if isinstance(value, list) else [value]
    return [f"--{name}", *(str(v) for v in values)]


def _unknown(table: dict, known: set[str], where: str) -> None:
    for k in table:
        if k not in known:
            close = closest(k, sorted(known))
            raise UserError(f"{where}: unknown key {k!r}" + (f" (did you mean {close!r}?)" if close else ""))


def load_study(path: Path) -> Study:
    if not path.is_file():
        raise UserError(f"{path}: study file not found")
    try:
        doc = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
    _unknown(doc, {"study", "eval", "variant"}, str(path))
    root, s = path.resolve().parent, doc.get("study", {})
    _unknown(s, STUDY_KEYS, f"{path}: [study]")
    _unknown(doc.get("eval", {}), EVAL_KEYS, f"{path}: [eval]")
    args = s.get("args", [])
    args = shlex.split(args) if isinstance(args, str) else args
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UserError(f"{path}: [study] args: expected a list of strings (or one command-line string)")
    if "config_file" in s:
        args = ["--config_file", str(_rel(root, s["config_file"], f"{path}: [study] config_file")), *args]
    variants, seen = [], set()
    for i, v in enumerate(doc.get("variant", [])):
        where = f"{path}: [[variant]] {i + 1}"
        name = v.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in seen:
            raise UserError(f"{where}: name: expected a unique name of letters, digits and '-', got {name!r}")
        seen.add(name)
        ds = v.get("dataset", {})
        if not isinstance(ds, dict):
            raise UserError(f"{where}: dataset: expected a table of dataset keys")
        flags = [a for k, val in v.items() if k not in ("name", "dataset") for a in _flag_args(k, val, where)]
        variants.append(Variant(name, tuple(flags), ds))
    if not variants:
        raise UserError(f"{path}: no [[variant]] tables")
    dataset = _rel(root, s["dataset_config"], f"{path}: [study] dataset_config") if "dataset_config" in s else None
    if any(v.dataset for v in variants) and dataset is None:
        raise UserError(f"{path}: [study] dataset_config is needed for variants that override dataset keys")
    ev = dict(doc.get("eval", {}))
    for key in ("prompts", "clip_model", "dino_model", "reference_dir"):
        if key in ev:
            ev[key] = str(_rel(root, ev[key], f"{path}: [eval] {key}"))
    if "prompts" not in ev:
        raise UserError(f"{path}: [eval] prompts is required (a .json/.toml/.txt prompts file)")
    return Study(path, _rel(root, s.get("output_dir", "study_output"), f"{path}: [study] output_dir"), tuple(args),
                 dataset, ev, tuple(variants), s.get("python", sys.executable))


# -------------------------------------------------------------------------------------------- training


def variant_dataset(base: Path, overrides: dict, out: Path) -> Path:
    """The base dataset TOML with `overrides` set in [general] and wherever a dataset or subset sets them;
    relative *_dir / *_file paths are made absolute (they were relative to the base file's folder)."""
    try:
        doc = toml.load(base)
    except (toml.TomlDecodeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{base}: dataset_config: cannot read it as TOML ({err})") from None

    def fix(table: dict) -> None:
        for k, v in list(table.items()):
            if (k.endswith("_dir") or k.endswith("_file")) and isinstance(v, str) and not Path(v).is_absolute() \
                    and (base.parent / v).exists():
                table[k] = str((base.parent / v).resolve())
            if k in overrides:
                table[k] = overrides[k]

    doc.setdefault("general", {}).update(overrides)
    for ds in doc.get("datasets", []):
        fix(ds)
        for sub in ds.get("subsets", []):
            fix(sub)
    return write_text_atomic(out, toml.dumps(doc))


def latest_state(folder: Path) -> Path | None:
    best, best_step = None, -1
    for d in folder.glob("*-state"):
        try:
            step = int(json.loads((d / "train_state.json").read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a state being written when the run was killed is incomplete
        if step > best_step:
            best, best_step = d, step
    return best


def variant_command(study: Study, v: Variant) -> tuple[str, list[str]]:
    """('skip' | 'resume' | 'train', the trainer's argv) for one variant."""
    out = study.output_dir / "train" / v.name
    if (out / f"{v.name}.safetensors").is_file():
        return "skip", []
    argv = [*study.base_args, *v.flags]
    if v.dataset:
        argv += ["--dataset_config", str(variant_dataset(study.dataset_config, v.dataset, out / "dataset.toml"))]
    elif study.dataset_config is not None:
        argv += ["--dataset_config", str(study.dataset_config)]
    argv += ["--output_dir", str(out), "--output_name", v.name, "--save_state"]
    state = latest_state(out) if out.is_dir() else None
    if state is not None:
        return "resume", [*argv, "--resume", str(state)]
    return "train", argv


def train_all(study: Study, dry_run: bool = False) -> None:
    for v in study.variants:
        action, argv = variant_command(study, v)
        cmd = [study.python, str(REPO / "flux_train_network.py"), *argv]
        print(f"[{v.name}] {action}" + ("" if action == "skip" else ": " + shlex.join(cmd)), flush=True)
        if action == "skip" or dry_run:
            continue
        (study.output_dir / "train" / v.name).mkdir(parents=True, exist_ok=True)
        code = subprocess.run(cmd, cwd=study.path.resolve().parent).returncode
        if code != 0:
            raise UserError(f"{study.path}: variant {v.name!r}: training failed (exit {code}); fix it and rerun the "
                            "study: finished variants are skipped and this one resumes from its last state")


# --------------------------------------------------------------------------------- render, score, report


def _flag(study: Study, name: str) -> str | None:
    args = list(study.base_args)
    for i, a in enumerate(args[:-1]):
        if a == f"--{name}":
            return args[i + 1]
    if "--config_file" in args:
        value = read_config_file(args[args.index("--config_file") + 1]).get(name)
        return None if value is None else str(value)
    return None


def evaluate(study: Study) -> Path:
    ev, out = study.eval, study.output_dir
    ckpt = _flag(study, "pretrained_model_name_or_path")
    models = {k: _flag(study, k) for k in ("clip_l", "t5xxl", "ae")}
    if not ckpt or not all(models.values()):
        raise UserError(f"{study.path}: the base command must give --pretrained_model_name_or_path, --clip_l, "
                        "--t5xxl and --ae (in args or its config_file)")
    loras = []
    for v in study.variants:
        found = find_loras([str(out / "train" / v.name)])
        loras += [type(lf)(lf.path, lf.name, lf.step, lf.metadata, v.name) for lf in found]
    root = study.path.resolve().parent  # the trainer ran there: its relative paths are relative to it
    cfg = RenderConfig(ckpt_path=root / ckpt, clip_l=root / models["clip_l"], t5xxl=root / models["t5xxl"],
                       ae=root / models["ae"], loras=tuple(loras), strengths=tuple(float(s) for s in ev.get("strengths", [0, 1])),
                       prompts=tuple(load_eval_prompts(ev["prompts"], "[eval] prompts")),
                       seeds=tuple(int(s) for s in ev.get("seeds", [1])), out_dir=out / "images",
                       width=int(ev.get("width", 1024)), height=int(ev.get("height", 1024)), steps=ev.get("steps"),
                       guidance=float(ev.get("guidance", 3.5)), t5xxl_max_token_length=ev.get("t5xxl_max_token_length"),
                       dtype=ev.get("dtype", "bfloat16"), fp8=bool(ev.get("fp8", False)), device=ev.get("device"))
    jobs = plan(cfg)
    if not all(is_done(j, cfg) for j in jobs):
        Renderer(cfg).render(jobs)
    sc = ScoreConfig(images=out / "images", out=out / "scores.csv", prompts=Path(ev["prompts"]),
                     clip_model=Path(ev["clip_model"]) if ev.get("clip_model") else None,
                     dino_model=Path(ev["dino_model"]) if ev.get("dino_model") else None,
                     reference_dir=Path(ev["reference_dir"]) if ev.get("reference_dir") else None,
                     class_token_map=parse_class_token_map(ev.get("class_token_map")), device=ev.get("device"),
                     batch_size=int(ev.get("batch_size", 32)))
    score(sc)
    return write_report([sc.out], sc.images, out / "report")


def run_study(path: Path, dry_run: bool = False) -> Path | str:
    study = load_study(path)
    train_all(study, dry_run)
    if dry_run:
        return "(dry run: nothing trained)"
    return evaluate(study)
