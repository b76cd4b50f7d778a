"""Sample prompts for previews during training, in kohya's formats (.txt, .toml, .json).

.txt: one prompt per line (blank lines and '#' comments skipped) with inline options split on " --":
    a photo of sks dog --w 768 --h 512 --d 42 --s 20 --g 3.5 --l 1.0 --n blurry
.toml: [prompt] defaults and [[prompt.subset]] entries, each merged over the defaults.
.json: a list of strings or of objects with the same keys (prompt, width, height, seed, sample_steps,
guidance_scale, scale, negative_prompt).
A reference image (FLUX.1 Kontext edits / restoration) per prompt: `--ci PATH` in .txt, `control_image` in .toml
and .json; a relative path is taken from the current folder, else from the prompt file's folder.
Every value is checked when the file is read (the trainer reads it before anything is written): a size outside
[16, 16384], steps outside [1, 10000], a nan/inf guidance or scale, a seed beyond 64 bits or a --ci file that
is not a whole image is one line naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml

from library.errors import UserError
from library.flux.geometry import PIXEL_MULTIPLE
from library.sampling import check_sample_values, open_control_image

# kohya's option letters -> our field names
_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "sample_steps", "g": "guidance_scale", "l": "scale",
            "n": "negative_prompt", "ss": "sample_sampler", "cn": "controlnet_image", "ctr": "cfg_trunc_ratio",
            "rcfg": "renorm_cfg", "fs": "flow_shift", "ci": "control_image"}
_UNUSED = ("sample_sampler", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift")


@dataclass(frozen=True)
class SamplePrompt:
    index: int
    prompt: str
    width: int = 512
    height: int = 512
    seed: int | None = None
    sample_steps: int = 20
    guidance_scale: float = 3.5
    scale: float = 1.0  # true CFG (kohya --l); 1.0 = off
    negative_prompt: str = ""
    control_image: str | None = None  # Kontext reference image (a checked, existing path)


def _round16(v: Any, where: str) -> int:
    """A side floored to 16 pixels (sides from 16 up to 63 become 64, kohya's smallest sample)."""
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected an integer size, got {v!r}") from None
    return max(64, v // PIXEL_MULTIPLE * PIXEL_MULTIPLE) if v >= PIXEL_MULTIPLE else v


def _control_path(value: Any, base: Path | None, where: str) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    p = Path(str(value).strip())
    if not p.is_file() and base is not None and not p.is_absolute() and (base / p).is_file():
        p = base / p
    if not p.is_file():
        raise UserError(f"{where}: control image {value} not found (--ci / control_image)")
    open_control_image(p, f"--ci in {where}")  # a truncated or hostile file: one line now, not at sampling
    return str(p)


def _make(index: int, d: dict[str, Any], where: str, base: Path | None = None) -> SamplePrompt:
    if "prompt" not in d or not str(d["prompt"]).strip():
        raise UserError(f"{where}: no prompt text")
    control = _control_path(d.get("control_image"), base, where)
    try:
        width, height = _round16(d.get("width", 512), where), _round16(d.get("height", 512), where)
        seed = None if d.get("seed") is None else int(d["seed"])
        steps, guidance, scale = int(d.get("sample_steps", 20)), float(d.get("guidance_scale", 3.5)), \
            float(d.get("scale", 1.0))
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: bad option value ({err})") from None
    check_sample_values(where, width, height, steps, guidance, scale, seed)
    return SamplePrompt(index=index, prompt=str(d["prompt"]).strip(), width=width, height=height, seed=seed,
                        sample_steps=min(1000, steps),  # kohya's cap for previews
                        guidance_scale=guidance, scale=scale,
                        negative_prompt=str(d.get("negative_prompt", "") or ""), control_image=control)


def parse_line(line: str, where: str) -> dict[str, Any]:
    """'prompt --w 512 --d 1' -> {'prompt': 'prompt', 'width': '512', 'seed': '1'} (case-insensitive keys)."""
    parts = line.split(" --")
    out: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        name = _OPTIONS.get(key.lower())
        if name is None:
            raise UserError(f"{where}: unknown option --{key} (known: {', '.join('--' + k for k in _OPTIONS)})")
        out[name] = value.strip()
    return out


def load_prompts(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: --sample_prompts file not found")
    suffix = path.suffix.lower()
    entries: list[dict[str, Any]] = []
    if suffix == ".toml":
        try:
            doc = toml.load(path)
        except toml.TomlDecodeError as err:
            raise UserError(f"{path}: not valid TOML: {err}") from None
        base = {k: v for k, v in doc.get("prompt", {}).items() if k != "subset"}
        entries = [{**base, **sub} for sub in doc.get("prompt", {}).get("subset", [])]
    elif suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(doc, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
        entries = [{"prompt": e} if isinstance(e, str) else dict(e) for e in doc]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        numbered = [(f"{path}:{i + 1}", line.strip()) for i, line in enumerate(lines)
                    if line.strip() and not line.strip().startswith("#")]
        return [_make(i, parse_line(line, where), where, path.parent) for i, (where, line) in enumerate(numbered)]
    return [_make(i, e, f"{path}: prompt {i + 1}", path.parent) for i, e in enumerate(entries)]

