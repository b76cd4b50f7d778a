"""Evaluation prompts with ids, and the class-token replacement used for CLIP scoring.

Formats: a .json object `{"00": "a photo of sks dog", ...}` (the layout published studies use) or list
of strings; a .toml file with a `[prompts]` table of `id = "text"`; a .txt file with one prompt per line
(blank lines and '#' comments skipped). List and .txt prompts get the ids 00, 01, ... in order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import toml

from library.errors import UserError

_ID = re.compile(r"^[A-Za-z0-9-]+$")  # no '_': ids sit between underscores in image names


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    text: str


def _check(path: Path, pairs: list[tuple[str, object]]) -> list[EvalPrompt]:
    out, seen = [], set()
    for pid, text in pairs:
        if not _ID.match(pid):
            raise UserError(f"{path}: prompt id {pid!r}: use letters, digits and '-' only (no '_' or spaces)")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}: prompt {pid!r}: expected a non-empty string, got {text!r}")
        if pid in seen:
            raise UserError(f"{path}: prompt id {pid!r} appears twice")
        seen.add(pid)
        out.append(EvalPrompt(pid, text.strip()))
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def load_eval_prompts(path: str | Path, flag: str = "--prompts") -> list[EvalPrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {flag} file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: {flag}: not valid JSON ({err})") from None
        if isinstance(doc, dict):
            return _check(path, [(str(k), v) for k, v in doc.items()])
        if isinstance(doc, list):
            return _check(path, [(f"{i:02d}", v) for i, v in enumerate(doc)])
        raise UserError(f"{path}: {flag}: expected a JSON object {{\"00\": \"prompt\", ...}} or a list of prompts")
    if suffix == ".toml":
        try:
            doc = toml.loads(text)
        except toml.TomlDecodeError as err:
            raise UserError(f"{path}: {flag}: not valid TOML ({err})") from None
        table = doc.get("prompts")
        unknown = sorted(set(doc) - {"prompts"})
        if not isinstance(table, dict) or unknown:
            raise UserError(f"{path}: {flag}: expected only a [prompts] table of id = \"text\""
                            + (f" (unknown keys: {', '.join(unknown)})" if unknown else ""))
        return _check(path, [(str(k), v) for k, v in table.items()])
    lines = [ln.strip() for ln in text.splitlines()]
    return _check(path, [(f"{i:02d}", ln) for i, ln in enumerate(ln for ln in lines if ln and not ln.startswith("#"))])


def parse_class_token_map(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """['sks dog=a dog', ...] -> (('sks dog', 'a dog'), ...); a trigger token is replaced by a description."""
    out = []
    for item in items or []:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip():
            raise UserError(f"--class_token_map {item!r}: expected 'TOKEN=replacement', e.g. 'sks dog=a dog'")
        out.append((src.strip(), dst.strip()))
    return tuple(out)


def apply_class_tokens(text: str, mapping: tuple[tuple[str, str], ...]) -> str:
    for src, dst in mapping:
        text = text.replace(src, dst)
    return text
