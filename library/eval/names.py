"""Image identifiers and the file names that carry them.

Rendered images are named `<lora>_<step>_<promptid>_<seed>_<strength>.png` (base-model images are
`base_0_<promptid>_<seed>_0.png`). Published LoRA studies use `<lora>_<step>_<promptid>_<anything>.png`
with a prompts JSON; both parse here. A LoRA name may contain underscores, so names are split from the
right, and for the published layout the split whose prompt id is in the prompts file wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from library.errors import UserError

BASE = "base"  # the LoRA name of strength-0 (base model) images
_RENDERED = re.compile(r"^(?P<lora>.+)_(?P<step>\d+)_(?P<pid>[A-Za-z0-9-]+)_(?P<seed>\d+)_(?P<strength>-?\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class ImageId:
    """What an image is: which LoRA at which training step, which prompt, seed and LoRA strength."""

    file: str
    lora: str
    step: int | None
    prompt_id: str
    seed: int | None = None
    strength: float | None = None

    @property
    def is_base(self) -> bool:
        return self.lora == BASE or self.strength == 0


def format_strength(strength: float) -> str:
    """1 -> '1', 0.5 -> '0.5', 0.25 -> '0.25' (no exponent, no trailing zeros)."""
    text = f"{strength:.4f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def image_name(lora: str, step: int, prompt_id: str, seed: int, strength: float) -> str:
    if strength == 0:
        lora, step = BASE, 0
    return f"{lora}_{step}_{prompt_id}_{seed}_{format_strength(strength)}.png"


def safe_name(text: str) -> str:
    """A LoRA or prompt name usable inside the pattern: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def parse_image_name(file: str, prompt_ids: set[str] | None = None, prompts_file: str = "the prompts file") -> ImageId:
    """Parse either layout; `prompt_ids` (from a prompts file) disambiguates the published one."""
    if not file.lower().endswith(".png"):
        raise UserError(f"{file}: not a .png image name (expected <lora>_<step>_<promptid>_<seed>_<strength>.png)")
    stem = file[:-4]
    m = _RENDERED.match(stem)
    if m and (prompt_ids is None or m["pid"] in prompt_ids):
        return ImageId(file, m["lora"], int(m["step"]), m["pid"], int(m["seed"]), float(m["strength"]))
    parts = stem.split("_")
    for i in range(1, len(parts) - 2):  # lora = parts[:i], step = parts[i], prompt id = parts[i + 1]
        step, pid = parts[i], parts[i + 1]
        if step.isdigit() and pid and (prompt_ids is None or pid in prompt_ids):
            return ImageId(file, "_".join(parts[:i]), int(step), pid)
    if m:
        raise UserError(f"{file}: prompt id {m['pid']!r} is not in {prompts_file} (ids: "
                        f"{', '.join(sorted(prompt_ids or ())[:8])}); add it or give the matching prompts file")
    known = f" with a prompt id from {prompts_file} ({', '.join(sorted(prompt_ids)[:5])} ...)" if prompt_ids else ""
    raise UserError(f"{file}: image name does not follow <lora>_<step>_<promptid>_<seed>_<strength>.png or "
                    f"<lora>_<step>_<promptid>_<anything>.png{known}; rename it or move it out of --images")
