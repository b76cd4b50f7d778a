"""Which path a LoRA was trained on, recorded in its metadata and honoured at inference and restore.

Two objectives (library/flow.py has the formulas):

- `noise` (default; FLUX.1 Kontext's own): σ = 1 is Gaussian noise, σ = 0 the target; a control image,
  if any, enters as clean reference tokens (first position-id axis 1).
- `flow_from_control`: σ = 1 is the control latent (plus `control_noise_std`·noise), σ = 0 the target;
  reference tokens only if `reference_tokens`. The sampler then starts from the (noised) control latent.

Keys (strings, kohya's `ss_` convention): `ss_flux_objective`, `ss_control_noise_std`,
`ss_flux_reference_tokens`. They are written even with --no_metadata, because inference depends on them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

OBJECTIVE_KEY = "ss_flux_objective"
NOISE_STD_KEY = "ss_control_noise_std"
REFERENCE_KEY = "ss_flux_reference_tokens"
OBJECTIVES = ("noise", "flow_from_control")


@dataclass(frozen=True)
class Objective:
    kind: str = "noise"  # one of OBJECTIVES
    control_noise_std: float = 0.0
    reference_tokens: bool = True  # the control image as Kontext reference tokens

    @property
    def from_control(self) -> bool:
        return self.kind == "flow_from_control"

    def to_metadata(self) -> dict[str, str]:
        return {OBJECTIVE_KEY: self.kind, NOISE_STD_KEY: repr(float(self.control_noise_std)),
                REFERENCE_KEY: str(bool(self.reference_tokens))}

    @staticmethod
    def from_metadata(md: dict[str, str], where: str = "LoRA") -> "Objective | None":
        """The recorded objective, or None when the file records none (any LoRA not trained here)."""
        if OBJECTIVE_KEY not in md:
            return None
        kind = md[OBJECTIVE_KEY]
        if kind not in OBJECTIVES:
            raise UserError(f"{where}: metadata {OBJECTIVE_KEY} = {kind!r} is not one of {', '.join(OBJECTIVES)}")
        try:
            std = float(md.get(NOISE_STD_KEY, "0"))
        except ValueError:
            raise UserError(f"{where}: metadata {NOISE_STD_KEY} = {md[NOISE_STD_KEY]!r} is not a number") from None
        return Objective(kind, std, md.get(REFERENCE_KEY, "True") == "True")


def objective_of_training(flow_from_control: bool, control_noise_std: float, flow_reference_tokens: bool
                          ) -> Objective:
    """The Objective a run with these flags trains (reference tokens always on for the noise objective)."""
    if not flow_from_control:
        return Objective()
    return Objective("flow_from_control", float(control_noise_std), bool(flow_reference_tokens))


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors header (the header only is read); {} for other files."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise UserError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in md.items()} if isinstance(md, dict) else {}


def objective_of_loras(paths: list[Path]) -> Objective | None:
    """The objective recorded by the given LoRAs (None if none records one); conflicting ones are an error."""
    found: dict[Objective, Path] = {}
    for p in paths:
        o = Objective.from_metadata(safetensors_metadata(p), str(p))
        if o is not None:
            found.setdefault(o, p)
    if len(found) > 1:
        a, b = list(found.items())[:2]
        raise UserError(f"{a[1]} and {b[1]} were trained with different objectives ({a[0].kind}, "
                        f"{b[0].kind}); pass --objective to choose one")
    return next(iter(found), None)


def resolve_objective(requested: str, loras: list[Path], control_noise_std: float | None = None,
                      reference_tokens: bool = False) -> Objective:
    """The objective inference uses: `auto` = what the LoRAs record (the noise objective when none does);
    `noise` / `flow_from_control` force one. `control_noise_std` (if not None) replaces the recorded std;
    `reference_tokens` adds reference tokens to a forced flow_from_control."""
    recorded = objective_of_loras(loras)
    if requested == "noise":
        return Objective()
    if requested == "auto" and (recorded is None or not recorded.from_control):
        return recorded or Objective()
    if requested not in ("auto", "flow_from_control"):
        raise UserError(f"--objective {requested!r}: use auto, noise or flow_from_control")
    base = recorded if recorded is not None and recorded.from_control else Objective("flow_from_control", 0.0, False)
    std = base.control_noise_std if control_noise_std is None else float(control_noise_std)
    return Objective("flow_from_control", std, base.reference_tokens or reference_tokens)
