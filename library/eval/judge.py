"""An optional LLM judge: an OpenAI-compatible chat endpoint (`/v1/chat/completions`) with vision input
asks the six questions of published LoRA studies about each image, each answered as a 0–1 score.

One request per image (the image, the prompt and, if given, one reference image) asking for a JSON
object with the six keys below. A request that times out (`timeout` seconds), returns HTTP 429/5xx or an
answer that is not that JSON object is retried (`retries` attempts, short backoff). Answers are cached
on disk (one JSON line per image, keyed by the model, the questions, the prompt and the image bytes), so
a rerun pays only for what it has not asked yet, and the scores CSV is rewritten as answers arrive, so a
crash loses nothing finished. An endpoint that cannot be reached at all is given up after the first
image: its columns stay empty and the notes (shown by the report) say why; the other metrics are kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from library.errors import UserError
from library.eval.table import write_rows

log = logging.getLogger(__name__)
QUESTIONS = {
    "judge_subject": "Is the person or subject the prompt asks for clearly present? (1 = clearly, 0 = absent)",
    "judge_same_subject": "Is it the same individual subject as in the reference image? (1 = same, 0 = different; "
                          "0.5 if no reference image is given)",
    "judge_prompt": "How well does the image follow the prompt? (1 = fully, 0 = not at all)",
    "judge_quality": "Overall image quality: sharpness, lighting, composition (1 = excellent, 0 = unusable)",
    "judge_limbs": "Are hands, limbs and anatomy plausible? (1 = fully plausible or none visible, 0 = badly wrong)",
    "judge_artifacts": "Is the image free of artifacts: grids, stripes, noise, smears, text garbage? (1 = clean)",
}
VERSION = "v1"  # part of the cache key: change it when the questions change


@dataclass(frozen=True)
class JudgeConfig:
    url: str
    model: str
    api_key: str
    timeout: float
    retries: int
    cache: Path
    reference: Path | None = None
    backoff: float = 1.0  # seconds before the 2nd attempt, doubled after each


class JudgeError(Exception):
    """One image could not be judged (after all retries); `unreachable` when no connection was possible."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def judge_config(url: str, model: str | None, key_env: str, timeout: float, retries: int, cache: str | None,
                 out: Path, reference_dir: Path | None) -> JudgeConfig:
    if not re.match(r"^https?://[^/\s]+", url):
        raise UserError(f"--judge_url {url!r}: expected an http(s) URL of a chat-completions endpoint")
    if not model:
        raise UserError("--judge_model is required with --judge_url (the model name the endpoint serves)")
    if not 0 < timeout <= 3600 or not 1 <= retries <= 20:
        raise UserError("--judge_timeout must be in (0, 3600] s and --judge_retries in 1 .. 20")
    refs = sorted(p for p in reference_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) \
        if reference_dir else []
    return JudgeConfig(url, model, os.environ.get(key_env, ""), timeout, retries,
                       Path(cache) if cache else out.with_name(out.stem + "_judge_cache.jsonl"),
                       refs[0] if refs else None)


def _data_url(path: Path) -> str:
    kind = "png" if path.suffix.lower() == ".png" else "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "webp"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def request_body(cfg: JudgeConfig, image: Path, prompt: str) -> dict:
    questions = "\n".join(f'"{k}": {q}' for k, q in QUESTIONS.items())
    text = (f"The first image was generated for the prompt: {prompt!r}." +
            (" The second image is a reference photo of the subject." if cfg.reference else " There is no reference image.")
            + f"\nAnswer each question with a number from 0 to 1.\n{questions}\n"
            "Reply with only a JSON object with exactly these keys and numeric values.")
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _data_url(image)}}]
    if cfg.reference:
        content.append({"type": "image_url", "image_url": {"url": _data_url(cfg.reference)}})
    return {"model": cfg.model, "temperature": 0, "messages": [
        {"role": "system", "content": "You rate generated images for a LoRA evaluation. Be strict and consistent."},
        {"role": "user", "content": content}]}


def parse_answer(raw: bytes) -> dict[str, float]:
    """The six scores from a chat-completions response body; ValueError when it is not what was asked."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        raise ValueError("not a chat-completions response") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    m = re.search(r"\{.*\}", str(content), re.S)
    try:
        answer = json.loads(m.group(0)) if m else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise ValueError(f"the answer is not a JSON object: {str(content)[:80]!r}")
    out = {}
    for k in QUESTIONS:
        v = answer.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"the answer's {k} is {v!r}, not a number in 0 .. 1")
        out[k] = float(v)
    return out


def ask(cfg: JudgeConfig, image: Path, prompt: str) -> dict[str, float]:
    body = json.dumps(request_body(cfg, image, prompt)).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    last, connected = "", False
    for attempt in range(cfg.retries):
        if attempt:
            time.sleep(cfg.backoff * 2 ** (attempt - 1))
        req = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                connected = True
                return parse_answer(resp.read())
        except urllib.error.HTTPError as err:
            connected = True
            last = f"HTTP {err.code}"
            if err.code not in (408, 429) and err.code < 500:
                break  # 400/401/404: asking again will not help
        except (socket.timeout, TimeoutError):
            connected, last = True, f"no answer within {cfg.timeout:g} s"
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.timeout, TimeoutError)):
                connected, last = True, f"no answer within {cfg.timeout:g} s"
            else:
                last = f"cannot connect ({err.reason})"
        except ValueError as err:
            connected, last = True, f"malformed answer ({err})"
        except (ConnectionError, OSError) as err:
            last = f"connection failed ({err.__class__.__name__})"
    raise JudgeError(f"{image.name}: {last} after {attempt + 1} attempt(s)", unreachable=not connected)


def cache_key(cfg: JudgeConfig, image: Path, prompt: str) -> str:
    h = hashlib.sha256()
    for part in (VERSION, cfg.model, json.dumps(QUESTIONS, sort_keys=True), prompt):
        h.update(part.encode("utf-8") + b"\0")
    h.update(image.read_bytes())
    if cfg.reference:
        h.update(cfg.reference.read_bytes())
    return h.hexdigest()


def load_cache(path: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                out[entry["key"]] = {k: float(entry["scores"][k]) for k in QUESTIONS}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn last line after a crash: ignored, that image is asked again
    return out


def _append(path: Path, key: str, scores: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"key": key, "scores": scores}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def judge_rows(cfg: JudgeConfig, items: list, rows: list[dict], columns: list[str], notes: dict[str, str],
               out: Path) -> tuple[list[str], list[dict]]:
    """Add the judge columns to `rows` (same order as `items`), rewriting the CSV as answers arrive."""
    columns = [*columns, *QUESTIONS]
    cache = load_cache(cfg.cache)
    failures: list[str] = []
    for i, (item, row) in enumerate(tqdm(list(zip(items, rows)), desc="judge", unit="img")):
        key = cache_key(cfg, item.path, item.prompt)
        if key not in cache:
            try:
                cache[key] = ask(cfg, item.path, item.prompt)
            except JudgeError as err:
                failures.append(str(err))
                log.warning("judge: %s", err)
                if err.unreachable:
                    notes.update({k: f"judge endpoint {cfg.url} unreachable: {err}" for k in QUESTIONS})
                    break
                continue
            _append(cfg.cache, key, cache[key])
            if i % 8 == 7:
                write_rows(out, columns, rows)
        row.update(cache[key])
    else:
        if failures:
            notes.update({k: f"judge failed for {len(failures)} of {len(rows)} image(s), e.g. {failures[0]}"
                          for k in QUESTIONS})
    write_rows(out, columns, rows)
    return columns, rows
