"""Evaluate FLUX.1 LoRAs: render a grid of images, score them, report plots and an HTML page, run studies.

    python flux_eval_lora.py render --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \\
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --loras "output/my_lora*.safetensors" \\
        --strengths 0,0.5,1 --prompts prompts.json --seeds 1,2 --out_dir eval/images
    python flux_eval_lora.py score --images eval/images --prompts prompts.json --clip_model clip-vit-large-patch14 \\
        --reference_dir train_images --class_token_map "sks dog=a dog" --out eval/scores.csv
    python flux_eval_lora.py report --scores eval/scores.csv --images eval/images --out_dir eval/report
    python flux_eval_lora.py study study.toml

See docs/evaluation.md for what each metric means and how to read the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.atomic import check_writable_folder
from library.errors import UserError, run_main
from library.flux.model_flags import component_path


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not values or any(v != v or abs(v) > 100 for v in values):
        raise UserError(f"{flag} {text!r}: expected finite numbers between -100 and 100")
    return values


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not values or any(not 0 <= v < 2 ** 63 for v in values):
        raise UserError(f"{flag} {text!r}: seeds must be 0 .. 2**63-1")
    return values


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="render LoRAs x strengths x prompts x seeds (resumes a half-done render)")
    g = p.add_argument_group("models (as flux_minimal_inference.py)")
    g.add_argument("--ckpt_path", required=True, help="FLUX.1 transformer file or diffusers folder")
    g.add_argument("--clip_l", help="CLIP-L file; default: the diffusers folder's text_encoder/")
    g.add_argument("--t5xxl", help="T5-XXL file; default: text_encoder_2/")
    g.add_argument("--ae", help="autoencoder file; default: vae/")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--fp8", action="store_true", help="store the transformer's block weights in float8 e4m3")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("what to render")
    g.add_argument("--loras", nargs="*", default=[], metavar="PATH|GLOB|DIR",
                   help="LoRA files, globs ('output/my_lora-*.safetensors') or training output folders")
    g.add_argument("--strengths", default="0,1", help="comma-separated LoRA strengths; 0 = the base model (default 0,1)")
    g.add_argument("--prompts", required=True, help="prompts: .json {\"00\": \"...\"} or list, .toml [prompts], .txt lines")
    g.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--width", type=int, default=1024, help="floored to a multiple of 16 (default 1024)")
    g.add_argument("--height", type=int, default=1024, help="floored to a multiple of 16 (default 1024)")
    g.add_argument("--steps", type=int, default=None, help="default 28 for dev, 4 for schnell")
    g.add_argument("--guidance", type=float, default=3.5, help="embedded guidance (dev)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default 512 dev, 256 schnell")
    g = p.add_argument_group("output")
    g.add_argument("--out_dir", required=True, help="folder of the images (<lora>_<step>_<promptid>_<seed>_<strength>.png)")


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score a folder of images into a CSV (one row per image)")
    g = p.add_argument_group("input")
    g.add_argument("--images", required=True, help="folder of <lora>_<step>_<promptid>_<seed>_<strength>.png "
                   "(or <lora>_<step>_<promptid>_<anything>.png with --prompts)")
    g.add_argument("--prompts", default=None, help="prompts file with the ids in the names (default: each PNG's metadata)")
    g.add_argument("--class_token_map", nargs="*", default=[], metavar="TOKEN=TEXT",
                   help="replace a trigger by a description for CLIP scoring, e.g. 'sks dog=a dog'")
    g = p.add_argument_group("metrics (frequency metrics need no model and always run)")
    g.add_argument("--clip_model", default=None, help="CLIP folder in transformers layout: clip_score (+ clip_i)")
    g.add_argument("--reference_dir", default=None, help="reference (training) images for clip_i and dino")
    g.add_argument("--dino_model", default=None, help="DINO / DINOv2 folder in transformers layout: dino")
    g.add_argument("--device", default=None, help="default: cuda if available (batched), else cpu")
    g.add_argument("--batch_size", type=int, default=32, help="images per model call (default 32)")
    g = p.add_argument_group("LLM judge (optional; an OpenAI-compatible chat endpoint)")
    g.add_argument("--judge_url", default=None, help="e.g. http://127.0.0.1:8000/v1/chat/completions")
    g.add_argument("--judge_model", default=None, help="model name sent to the endpoint")
    g.add_argument("--judge_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--judge_timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--judge_retries", type=int, default=3, help="attempts per image (default 3)")
    g.add_argument("--judge_cache", default=None, help="cache file (default: <out>_judge_cache.jsonl)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="scores CSV (the spectra go to <out>_spectra.npz)")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plots and one HTML page from scores CSVs")
    p.add_argument("--scores", nargs="+", required=True, help="scores CSV(s) written by `score`")
    p.add_argument("--images", default=None, help="the images folder (for the grids; default: beside the CSV)")
    p.add_argument("--out_dir", required=True, help="report folder (index.html, plots/)")


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="train variants, then render, score and report them together")
    p.add_argument("study", help="STUDY.toml")
    p.add_argument("--dry_run", action="store_true", help="print the training commands and stop")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate FLUX.1 LoRAs: render, score, report, study.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_render(sub)
    _add_score(sub)
    _add_report(sub)
    _add_study(sub)
    return p


def _existing(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).exists():
        raise UserError(f"{path}: {flag}: no such file or folder")
    return Path(path)


def render_config(a: argparse.Namespace):
    from library.eval.prompts import load_eval_prompts  # noqa: PLC0415
    from library.eval.render import RenderConfig, find_loras  # noqa: PLC0415

    ckpt = _existing(a.ckpt_path, "--ckpt_path")
    for name in ("width", "height", "steps", "t5xxl_max_token_length"):
        v = getattr(a, name)
        if v is not None and not (16 if name in ("width", "height") else 1) <= v <= 8192:
            raise UserError(f"--{name} {v}: out of range")
    check_writable_folder(Path(a.out_dir), f"{Path(a.out_dir)}: --out_dir")
    return RenderConfig(
        ckpt_path=ckpt, clip_l=component_path(a.clip_l, ckpt, "--clip_l", "text_encoder"),
        t5xxl=component_path(a.t5xxl, ckpt, "--t5xxl", "text_encoder_2"), ae=component_path(a.ae, ckpt, "--ae", "vae"),
        loras=find_loras(a.loras), strengths=_floats(a.strengths, "--strengths"),
        prompts=tuple(load_eval_prompts(a.prompts)), seeds=_ints(a.seeds, "--seeds"), out_dir=Path(a.out_dir),
        width=a.width // 16 * 16, height=a.height // 16 * 16, steps=a.steps, guidance=a.guidance,
        t5xxl_max_token_length=a.t5xxl_max_token_length, dtype=a.dtype, fp8=a.fp8, device=a.device)


def score_config(a: argparse.Namespace):
    from library.eval.prompts import parse_class_token_map  # noqa: PLC0415
    from library.eval.score import ScoreConfig  # noqa: PLC0415

    if not 1 <= a.batch_size <= 4096:
        raise UserError(f"--batch_size {a.batch_size}: use 1 .. 4096")
    judge = None
    if a.judge_url:
        from library.eval.judge import judge_config  # noqa: PLC0415

        judge = judge_config(a.judge_url, a.judge_model, a.judge_key_env, a.judge_timeout, a.judge_retries,
                             a.judge_cache, Path(a.out), _existing(a.reference_dir, "--reference_dir"))
    return ScoreConfig(images=Path(a.images), out=Path(a.out), prompts=_existing(a.prompts, "--prompts"),
                       clip_model=Path(a.clip_model) if a.clip_model else None,
                       dino_model=Path(a.dino_model) if a.dino_model else None,
                       reference_dir=_existing(a.reference_dir, "--reference_dir"),
                       class_token_map=parse_class_token_map(a.class_token_map), device=a.device,
                       batch_size=a.batch_size, judge=judge)


def main(argv: list[str] | None = None) -> int:
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    a = build_parser().parse_args(argv)
    if a.command == "render":
        from library.eval.render import Renderer, is_done, plan  # noqa: PLC0415

        cfg = render_config(a)
        jobs = plan(cfg)
        made = Renderer(cfg).render(jobs) if not all(is_done(j, cfg) for j in jobs) else []
        print(f"rendered {len(made)} image(s), {len(jobs) - len(made)} already there, in {cfg.out_dir}")
    elif a.command == "score":
        from library.eval.score import score  # noqa: PLC0415

        out, rows = score(score_config(a))
        print(f"scored {len(rows)} image(s): {out}")
    elif a.command == "report":
        from library.eval.report import write_report  # noqa: PLC0415

        print(f"report: {write_report([Path(s) for s in a.scores], _existing(a.images, '--images'), Path(a.out_dir))}")
    else:
        from library.study import run_study  # noqa: PLC0415

        print(f"study report: {run_study(Path(a.study), dry_run=a.dry_run)}")
    return 0


if __name__ == "__main__":
    run_main(main)
