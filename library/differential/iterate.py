"""Iterative enhancement: differential LoRAs trained round after round on pairs made by the improved model.

    round 0: a differential LoRA L0 from the user's pairs (--dataset_config), or --initial_lora
    round k = 1..N:
      fuse     M_k = base + L0 + ... + L_{k-1}   (networks/flux_merge_lora.py, a working copy in bf16/fp8;
                                                 the user's base file is only read)
      pairs    the pair command (a shell template) writes before/ and after/ images made with M_k; the
               built-in default renders the prompts with our sampler: before = M_k, after = M_k + L_{k-1}
               at --after_strength (same prompt and seed)
      train    L_k = a differential LoRA on those pairs with M_k as the base (library/differential/run.py)
    combine    the result L = L0 + ... + LN, relative to the user's base: exact (ranks concatenated) or SVD to
               --combine_rank with the retained energy per module written beside it

Progress is recorded in `<output_dir>/<X>_iterate.json` after every step, so stopping and running the same
command again continues with the first unfinished step (a round's training resumes inside its stage).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from library.atomic import write_text_atomic
from library.data.images import list_images
from library.differential.render import RenderModels, RenderSettings, render
from library.differential.run import Trainer, fingerprint, read_progress_record, run_differential
from library.differential.stages import DifferentialOptions, result_name
from library.errors import UserError
from library.train.checkpoint import file_sha256
from library.train.cli import ParsedArgs
from networks import lora_algebra as A
from networks.flux_merge_lora import deltas_by_component, merge_into_file
from networks.lora_flux import save_lora
from networks.lora_metadata import NETWORK_MODULE, modelspec
from networks.lora_svd import parse_dtype

log = logging.getLogger(__name__)

FUSE_PRECISIONS = ("bf16", "fp8", "float")


@dataclass(frozen=True)
class IterateOptions:
    iterations: int = 1
    initial_lora: str | None = None  # round 0's LoRA (else trained from --dataset_config)
    pair_command: str | None = None  # shell template: {model} {out} {round} {ae} {clip_l} {t5xxl} {prompts}
    prompts: str | None = None  # prompt file (one per line) for the built-in pair generation
    images_per_prompt: int = 2
    after_strength: float = 1.0
    pair_width: int = 64
    pair_height: int = 64
    pair_steps: int = 8
    pair_guidance: float = 3.5
    fuse_precision: str = "bf16"
    combine_rank: int | None = None  # None: exact (concatenated ranks)
    keep_models: bool = False  # keep every round's fused working model (default: only the newest)


def check_options(o: IterateOptions) -> None:
    if o.iterations < 0:
        raise UserError(f"command line: --iterations {o.iterations}: must be >= 0")
    if o.fuse_precision not in FUSE_PRECISIONS:
        raise UserError(f"command line: --fuse_precision {o.fuse_precision}: expected one of "
                        f"{', '.join(FUSE_PRECISIONS)}")
    if o.combine_rank is not None and o.combine_rank < 1:
        raise UserError(f"command line: --combine_rank {o.combine_rank}: must be >= 1")
    if o.images_per_prompt < 1 or o.pair_steps < 1 or min(o.pair_width, o.pair_height) < 16:
        raise UserError("command line: --images_per_prompt and --pair_steps must be >= 1, "
                        "--pair_width/--pair_height >= 16")
    if o.iterations and o.pair_command is None:
        if not o.prompts or not Path(o.prompts).is_file():
            raise UserError(f"command line: --prompts {o.prompts}: a prompt file (one prompt per line) is needed for "
                            "the built-in pair generation (or give --pair_command)")
    if o.initial_lora and not Path(o.initial_lora).is_file():
        raise UserError(f"{o.initial_lora}: --initial_lora: no such file")


def read_prompts(path: str) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: --prompts: no prompt (one per line; # starts a comment)")
    return prompts


@dataclass
class IterProgress:
    path: Path
    fingerprint: str
    done: dict[str, Any]  # "r{k}.model" / "r{k}.pairs" / "r{k}.lora" / "final" -> record

    def mark(self, key: str, record: Any) -> None:
        self.done[key] = record
        write_text_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "done": self.done}, indent=1))


def open_iter_progress(out_dir: Path, name: str, print_: str) -> IterProgress:
    path = out_dir / f"{name}_iterate.json"
    if not path.is_file():
        if (out_dir / f"{name}.safetensors").exists():
            raise UserError(f"{out_dir / f'{name}.safetensors'}: already exists and is not from this run (no "
                            f"{path.name}); choose another --output_name or --output_dir")
        return IterProgress(path, print_, {})
    return IterProgress(path, print_, read_progress_record(path, out_dir, print_, "done", "an iteration"))


# ------------------------------------------------------------------------------------------------ steps

def fuse(base: Path, loras: list[Path], out: Path, precision: str) -> Path:
    """M = base + Σ loras, written to `out` (the base is only read)."""
    deltas = deltas_by_component([(p, 1.0) for p in loras], "cpu").get("transformer", {})
    merge_into_file(base, out, deltas, parse_dtype(precision, "--fuse_precision", allow_fp8=True), "transformer")
    return out


def run_pair_command(template: str, fields: dict[str, str], out: Path) -> None:
    """Run the user's shell template; it must write out/before/* and out/after/* (same names)."""
    try:
        command = template.format(**{k: shlex.quote(v) for k, v in fields.items()})
    except (KeyError, IndexError, ValueError) as e:
        names = ", ".join("{" + k + "}" for k in fields)
        raise UserError(f"--pair_command: unknown or bad placeholder {e} (use {names})") from None
    log.info("pair command: %s", command)
    res = subprocess.run(command, shell=True, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"--pair_command failed with exit status {res.returncode} for {out}: {tail[0]}")
    for side in ("before", "after"):
        if not list_images(out / side):
            raise UserError(f"{out / side}: the pair command wrote no {side} images (expected {out}/before/NAME.png "
                            f"and {out}/after/NAME.png)")


def render_pairs(o: IterateOptions, model: Path, last_lora: Path, parsed: ParsedArgs, out: Path) -> None:
    """Built-in pairs: each prompt x images_per_prompt seeds, before = model, after = model + last LoRA."""
    v = parsed.values
    prompts = read_prompts(o.prompts)
    jobs = [(p, 1000 * i + j) for i, p in enumerate(prompts) for j in range(o.images_per_prompt)]
    models = RenderModels(model, Path(v["ae"]), Path(v["clip_l"]), Path(v["t5xxl"]))
    settings = RenderSettings(o.pair_width, o.pair_height, o.pair_steps, o.pair_guidance, v["t5xxl_max_token_length"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for side, loras in (("before", []), ("after", [(last_lora, o.after_strength)])):
        (tmp / side).mkdir(parents=True)
        images = render(models, [p for p, _ in jobs], [s for _, s in jobs], loras, settings)
        for k, ((prompt, _), r) in enumerate(zip(jobs, images)):
            Image.fromarray(np.asarray(r.image)).save(tmp / side / f"{k:04d}.png")
            if side == "after":
                (tmp / side / f"{k:04d}.txt").write_text(prompt + "\n", encoding="utf-8")
    tmp.rename(out)


def pairs_toml(out: Path, width: int, height: int, batch_size: int) -> Path:
    path = out / "pairs.toml"
    write_text_atomic(path, f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = [{width}, {height}]\n'
                            f'batch_size = {batch_size}\n[[datasets.subsets]]\nimage_dir = "{out / "after"}"\n'
                            f'before_dir = "{out / "before"}"\n')
    return path


def _round_args(parsed: ParsedArgs, **values: Any) -> ParsedArgs:
    return ParsedArgs(values={**parsed.values, **values}, given=parsed.given | frozenset(values))


# ------------------------------------------------------------------------------------------------ loop

def run_iterations(parsed: ParsedArgs, diff: DifferentialOptions, o: IterateOptions, train: Trainer) -> Path:
    check_options(o)
    v = parsed.values
    base = Path(v["pretrained_model_name_or_path"] or "")
    if not base.is_file():
        raise UserError(f"{base}: --pretrained_model_name_or_path: a BFL .safetensors file is needed (it is fused "
                        "into working copies)")
    out_dir, name = Path(v["output_dir"] or "output"), result_name(parsed)
    extra = {"iterate": asdict(o), "initial_sha256": file_sha256(Path(o.initial_lora)) if o.initial_lora else None,
             "prompts": read_prompts(o.prompts) if o.prompts and o.pair_command is None else None}
    progress = open_iter_progress(out_dir, name, fingerprint(parsed, diff, extra))
    loras = [round0(parsed, diff, o, out_dir, name, train, progress)]
    for k in range(1, o.iterations + 1):
        loras.append(one_round(parsed, diff, o, k, loras, out_dir, name, train, progress))
    return combine_rounds(loras, o, out_dir / f"{name}.safetensors", progress)


def round0(parsed: ParsedArgs, diff: DifferentialOptions, o: IterateOptions, out_dir: Path, name: str,
           train: Trainer, progress: IterProgress) -> Path:
    if o.initial_lora:
        return Path(o.initial_lora)
    if "r0.lora" not in progress.done:
        lora = run_differential(_round_args(parsed, output_dir=str(out_dir / "round_0"), output_name=f"{name}_r0"),
                                diff, train)
        progress.mark("r0.lora", {"file": str(lora), "sha256": file_sha256(lora)})
    return Path(progress.done["r0.lora"]["file"])


def one_round(parsed: ParsedArgs, diff: DifferentialOptions, o: IterateOptions, k: int, loras: list[Path],
              out_dir: Path, name: str, train: Trainer, progress: IterProgress) -> Path:
    rdir = out_dir / f"round_{k}"
    if f"r{k}.lora" in progress.done:
        return Path(progress.done[f"r{k}.lora"]["file"])
    model = rdir / f"{name}_model_r{k}.safetensors"
    if f"r{k}.model" not in progress.done or not model.is_file():
        log.info("round %d: fusing %d LoRA(s) into a working copy of %s", k, len(loras),
                 parsed.values["pretrained_model_name_or_path"])
        fuse(Path(parsed.values["pretrained_model_name_or_path"]), loras, model, o.fuse_precision)
        progress.mark(f"r{k}.model", {"file": str(model)})
        previous = out_dir / f"round_{k - 1}" / f"{name}_model_r{k - 1}.safetensors"
        if not o.keep_models and previous.is_file():
            previous.unlink()  # our own working copy of the previous round: regenerable, and as big as the base
    pairs = rdir / "pairs"
    if f"r{k}.pairs" not in progress.done:
        shutil.rmtree(pairs, ignore_errors=True)  # a half-written set from a stopped run (ours)
        make_pairs(parsed, o, k, model, loras[-1], pairs)
        progress.mark(f"r{k}.pairs", {"dir": str(pairs)})
    toml = pairs_toml(pairs, o.pair_width, o.pair_height, int(parsed.values["train_batch_size"] or 1))
    lora = run_differential(_round_args(parsed, pretrained_model_name_or_path=str(model), dataset_config=str(toml),
                                        output_dir=str(rdir), output_name=f"{name}_r{k}"), diff, train)
    progress.mark(f"r{k}.lora", {"file": str(lora), "sha256": file_sha256(lora)})
    return lora


def make_pairs(parsed: ParsedArgs, o: IterateOptions, k: int, model: Path, last_lora: Path, pairs: Path) -> None:
    if o.pair_command is None:
        render_pairs(o, model, last_lora, parsed, pairs)
        return
    pairs.mkdir(parents=True, exist_ok=True)
    v = parsed.values
    fields = {"model": str(model), "out": str(pairs), "round": str(k), "ae": str(v["ae"]),
              "clip_l": str(v["clip_l"]), "t5xxl": str(v["t5xxl"]), "prompts": str(o.prompts or ""),
              "lora": str(last_lora)}
    run_pair_command(o.pair_command, fields, pairs)


def combine_rounds(loras: list[Path], o: IterateOptions, out: Path, progress: IterProgress) -> Path:
    """The rounds' sum as one LoRA (exact or SVD), with the retained energy per module for SVD."""
    if "final" in progress.done and out.is_file() and file_sha256(out) == progress.done["final"]["sha256"]:
        log.info("combined LoRA %s finished earlier, kept", out)
        return out
    result = A.combine(A.read_terms([(p, 1.0) for p in loras]), o.combine_rank)
    ranks = sorted({w.rank for w in result.weights.values()})
    md = {"ss_network_module": NETWORK_MODULE, "ss_base_model_version": "flux1", "ss_network_dim": str(max(ranks)),
          "ss_network_alpha": str(max(ranks)),
          **modelspec(out.stem, extra={"enhance_rounds": json.dumps([p.name for p in loras]),
                                       "enhance_round_sha256": json.dumps([file_sha256(p) for p in loras]),
                                       "enhance_combine": "exact" if o.combine_rank is None else
                                       f"svd rank {o.combine_rank}"})}
    save_lora(result.weights, out, None, md)
    if result.energy:
        write_text_atomic(out.with_name(out.stem + "_energy.json"),
                          json.dumps({"combine_rank": o.combine_rank, "energy": result.energy}, indent=1))
        log.info("%s", A.energy_summary(result.energy))
    progress.mark("final", {"file": str(out), "sha256": file_sha256(out)})
    log.info("combined %d round(s) (ranks %s) -> %s", len(loras), ranks, out)
    return out
