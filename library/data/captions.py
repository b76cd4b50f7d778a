"""Captions: reading caption files and kohya's per-step caption processing, with an explicit RNG.

Processing order (kohya `process_caption`, re-derived):
  1. caption_prefix / caption_suffix, joined with a space;
  2. caption dropout (caption_dropout_rate, or every caption_dropout_every_n_epochs-th epoch, 1-based) -> "";
  3. wildcards: one caption line is picked at random (multi-line files), then `{a|b|c}` picks one option;
     `{{` / `}}` are literal braces;
  4. when shuffling, token warm-up or tag dropout is on: split on caption_separator into a fixed head
     (keep_tokens tags, or everything before keep_tokens_separator), a flexible middle and a fixed tail
     (after a second keep_tokens_separator); warm-up truncates, shuffle permutes, tag dropout drops the
     middle; the parts are joined with ", ";
  5. secondary_separator is replaced by caption_separator.
`keep_tokens` counts tags, not tokenizer tokens. Every random draw comes from the `random.Random` passed
in, so a caption is a pure function of (text, settings, rng state, epoch, step).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import UserError

_WILDCARD = re.compile(r"\{([^{}]*)\}")
_LBRACE, _RBRACE = "\x00lbrace\x00", "\x00rbrace\x00"


@dataclass(frozen=True)
class CaptionSpec:
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    shuffle_caption: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @classmethod
    def from_subset(cls, sub: Any) -> "CaptionSpec":
        return cls(**{f: getattr(sub, f) for f in cls.__dataclass_fields__})

    @property
    def is_random(self) -> bool:
        """True when two draws of the same caption may differ (TE caching must then cache variants)."""
        return bool(self.shuffle_caption or self.enable_wildcard or self.caption_dropout_rate > 0
                    or self.caption_dropout_every_n_epochs > 0 or self.caption_tag_dropout_rate > 0
                    or self.token_warmup_step > 0)


def read_caption_file(path: Path, enable_wildcard: bool) -> list[str] | None:
    """The caption lines of `path` (the first non-empty line, or every line with wildcards); None if absent."""
    try:
        raw = path.read_bytes()
        # UTF-16 with a BOM is what Windows Notepad writes as "Unicode"; anything else must be UTF-8
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: caption file is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") \
            from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines if enable_wildcard else lines[:1]


def find_caption(image: Path, spec: CaptionSpec) -> tuple[list[str], str]:
    """Caption lines for an image and where they came from ("file", "class_tokens" or "none").

    Tries `<stem><ext>`, then the stem without kohya's face-crop suffix `_cx_cy_w_h`; falls back to
    class_tokens when no caption file exists (or it is empty).
    """
    candidates = [image.with_suffix(spec.caption_extension)]
    parts = image.stem.split("_")
    if len(parts) > 4:
        candidates.append(image.with_name("_".join(parts[:-4]) + spec.caption_extension))
    for cand in candidates:
        lines = read_caption_file(cand, spec.enable_wildcard)
        if lines:
            return lines, "file"
    if spec.class_tokens:
        return [spec.class_tokens], "class_tokens"
    return [""], "none"


def expand_wildcards(text: str, rng: random.Random) -> str:
    text = text.replace("{{", _LBRACE).replace("}}", _RBRACE)
    text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(_LBRACE, "{").replace(_RBRACE, "}")


def _split_tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _warmup_len(n_flex: int, spec: CaptionSpec, step: int, max_train_steps: int | None) -> int | None:
    warm = spec.token_warmup_step
    if 0 < warm < 1:  # a fraction of the run
        warm = int(warm * (max_train_steps or 0))
    if not warm or step >= warm:
        return None
    return int(step * ((n_flex - spec.token_warmup_min) / warm)) + spec.token_warmup_min


def _tag_parts(caption: str, spec: CaptionSpec) -> tuple[list[str], list[str], list[str]]:
    sep, kts = spec.caption_separator, spec.keep_tokens_separator
    if kts and kts in caption:
        head, flex = caption.split(kts, 1)
        tail = ""
        if kts in flex:
            flex, tail = flex.split(kts, 1)
        return _split_tags(head, sep), _split_tags(flex, sep), _split_tags(tail.replace(kts, sep), sep)
    tags = _split_tags(caption, sep)
    k = spec.keep_tokens
    return tags[:k], tags[k:], []


def process_caption(lines: list[str], spec: CaptionSpec, rng: random.Random, epoch: int = 1, step: int = 0,
                    max_train_steps: int | None = None) -> str:
    """One training-time caption from the caption lines; `epoch` is 1-based as in kohya's logs."""
    caption = rng.choice(lines) if spec.enable_wildcard and len(lines) > 1 else lines[0]
    if spec.caption_prefix:
        caption = f"{spec.caption_prefix} {caption}"
    if spec.caption_suffix:
        caption = f"{caption} {spec.caption_suffix}"
    dropped = spec.caption_dropout_rate > 0 and rng.random() < spec.caption_dropout_rate
    every = spec.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if spec.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    kts = spec.keep_tokens_separator
    if spec.shuffle_caption or spec.token_warmup_step > 0 or spec.caption_tag_dropout_rate > 0:
        head, flex, tail = _tag_parts(caption, spec)
        n = _warmup_len(len(flex), spec, step, max_train_steps)
        if n is not None:
            flex = flex[:max(0, n)]
        if spec.shuffle_caption:
            rng.shuffle(flex)
        if spec.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= spec.caption_tag_dropout_rate]
        caption = ", ".join(head + flex + tail)
    elif kts and kts in caption:  # the separator is a marker only; it never reaches the text encoder
        caption = ", ".join(p.strip(" " + spec.caption_separator) for p in caption.split(kts)
                            if p.strip(" " + spec.caption_separator))
    if spec.secondary_separator:
        caption = caption.replace(spec.secondary_separator, spec.caption_separator)
    return caption
