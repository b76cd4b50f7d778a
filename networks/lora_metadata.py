"""kohya's LoRA file metadata: `ss_*` training keys, `modelspec.*` (SAI model spec) and `sshs_*` hashes.

No loader needs any of it for the kohya key format; it is what kohya writes, so UIs that list or index
LoRAs (sd-webui-additional-networks, civitai) find what they expect. All values are strings.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json

import io
from safetensors.torch import save
import torch

NETWORK_MODULE = "networks.lora_flux"
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


def modelspec(title: str, schnell: bool = False, resolution: tuple[int, int] = (1024, 1024),
              extra: dict[str, str] | None = None) -> dict[str, str]:
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-schnell/lora" if schnell else "flux-1-dev/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    md.update({f"modelspec.{k}": str(v) for k, v in (extra or {}).items() if v is not None})
    return md


def build_kohya_metadata(network_dim: int, network_alpha: float, network_args: dict[str, object] | None = None,
                         title: str = "LoRA", schnell: bool = False, resolution: tuple[int, int] = (1024, 1024),
                         training: dict[str, object] | None = None, no_metadata: bool = False,
                         modelspec_extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's metadata from plain values.

    `training` holds the other `ss_*` values by their kohya name without the prefix (e.g.
    `{"learning_rate": 1e-4, "max_train_steps": 1000, "seed": 42}`); dicts/lists become JSON.
    `no_metadata` keeps only kohya's minimum keys plus modelspec (kohya writes those even then).
    """
    md: dict[str, str] = {
        "ss_v2": "False",
        "ss_base_model_version": "flux1",
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(network_alpha),
    }
    if network_args:
        md["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    if not no_metadata:
        for k, v in (training or {}).items():
            md[k if k.startswith("ss_") else f"ss_{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    md.update(modelspec(title, schnell, resolution, modelspec_extra))
    return md


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash` as sd-webui-additional-networks computes them.

    The file is serialised with only its `ss_*` metadata (user-editable keys do not change the hash);
    model hash = sha256 of the bytes after the header, legacy = sha256 of the 64 KiB at 1 MiB, 8 hex digits.
    """
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + n:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(io.BytesIO(blob).getbuffer()[0x100000:0x110000]).hexdigest()[:8],
    }
