"""Loading the FLUX transformer and autoencoder from the files users have.

Accepted: BFL single files (`flux1-dev.safetensors`, `ae.safetensors`), all-in-one checkpoints (transformer
under `model.diffusion_model.`, AE under `first_stage_model.`/`vae.`; other components' keys ignored) and
diffusers folders (the pipeline folder or its `transformer/` / `vae/` subfolder, sharded with an index).

Design note: the model is built on the meta device from sizes read off the header shapes, every key and
shape is checked before a single tensor is read, and then each tensor is streamed from the mmap'd file to
the target device and dtype and assigned (`load_state_dict(strict=True, assign=True)`): no random init, no
second full copy in host memory. diffusers layouts are converted at this edge (library.flux.convert).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from library.errors import UserError
from library.flux.autoencoder import AutoEncoder, AutoEncoderParams
from library.flux.convert import ae_diffusers_to_bfl, apply_plan_entry, is_diffusers_ae, \
    is_diffusers_transformer, transformer_diffusers_plan
from library.flux.model import FP8_DTYPE, Flux, FluxParams, apply_fp8_storage, to_fp8
from library.flux.safetensors_io import Checkpoint, first_keys, open_checkpoint, shard_files

log = logging.getLogger(__name__)

_TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_AE_PREFIXES = ("first_stage_model.", "vae.")


def _resolve(path: str | Path, subfolder: str, what: str) -> list[Path]:
    """The safetensors file(s) for `path`: a file, a diffusers component folder or a pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder ({what})")
    if path.is_file():
        return [path]
    for folder in (path / subfolder, path):
        files = shard_files(folder, "diffusion_pytorch_model") if folder.is_dir() else None
        if files:
            return files
    raise UserError(f"{path}: folder has no {subfolder}/diffusion_pytorch_model.safetensors "
                    f"(or sharded index); pass the {what} file or a diffusers folder")


def _kind_of(keys: list[str]) -> str | None:
    """A guess at what a checkpoint is, for messages when it is not what was asked for."""
    ks = set(keys)
    if any(".lora_down." in k or ".lora_A." in k or k.startswith("lora_unet_") for k in ks):
        return "a LoRA (pass it as --network_weights / --lora_weights)"
    if any(k.startswith(("encoder.block.", "shared.")) for k in ks):
        return "a T5 text encoder (pass it as --t5xxl)"
    if any(k.startswith(("text_model.", "transformer.text_model.")) for k in ks):
        return "a CLIP text encoder (pass it as --clip_l)"
    if any(k.startswith(("encoder.conv_in", "decoder.conv_in")) for k in ks):
        return "a FLUX autoencoder (pass it as --ae)"
    if any(k.startswith(("double_blocks.", "img_in.", "transformer_blocks.", "x_embedder."))
           or k.startswith(_TRANSFORMER_PREFIXES) for k in ks):
        return "a FLUX transformer (pass it as --ckpt_path / --pretrained_model_name_or_path)"
    return None


def _check(ckpt_name: str, what: str, expected: dict[str, torch.Tensor],
           shapes: dict[str, tuple[int, ...]]) -> None:
    """Strict key and shape check: missing, unexpected, wrong shape -> UserError naming the first keys."""
    missing = expected.keys() - shapes.keys()
    if missing:
        raise UserError(f"{ckpt_name}: not a {what}: missing {len(missing)} keys ({first_keys(missing)})")
    unexpected = shapes.keys() - expected.keys()
    if unexpected:
        raise UserError(f"{ckpt_name}: not a {what}: {len(unexpected)} unexpected keys ({first_keys(unexpected)})")
    for key in sorted(expected):
        if tuple(expected[key].shape) != tuple(shapes[key]):
            raise UserError(f"{ckpt_name}: {key}: shape {tuple(shapes[key])}, expected "
                            f"{tuple(expected[key].shape)} for a {what} of this size")


def _stream(model: nn.Module, ckpt: Checkpoint, sources: dict[str, Callable[[], torch.Tensor]],
            device: torch.device) -> None:
    """Read each tensor, move it to `device` and the dtype the (meta) model holds for it, then assign."""
    targets = model.state_dict()
    sd = {}
    for key, read in sources.items():
        t = read().to(device)
        want = targets[key].dtype
        sd[key] = to_fp8(t) if want == FP8_DTYPE else t.to(want)
    model.load_state_dict(sd, strict=True, assign=True)


def _component(ckpt: Checkpoint, prefixes: tuple[str, ...], marker: str) -> tuple[str, list[str]]:
    """(prefix, keys without prefix) of the component whose `marker` key is found, else ("", all keys)."""
    for prefix in prefixes:
        if prefix + marker in ckpt:
            return prefix, [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]
    return "", ckpt.keys()


def load_transformer(path: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> Flux:
    """Load a FLUX.1 transformer (dev or schnell, any size) from a BFL file, an all-in-one checkpoint or a
    diffusers folder. `fp8` stores the block Linear weights as float8 e4m3 (compute stays in `dtype`).
    `device="meta"` checks every key and shape from the header(s) and returns the unloaded model (cheap)."""
    start = time.perf_counter()
    device = torch.device(device)
    with open_checkpoint(_resolve(path, "transformer", "transformer")) as ckpt:
        prefix, keys = _component(ckpt, _TRANSFORMER_PREFIXES, "img_in.weight")
        what = "FLUX transformer"
        if is_diffusers_transformer(keys):
            shapes, sources = _plan_sources(ckpt, transformer_diffusers_plan(keys), prefix)
        else:
            shapes = {k: ckpt.shapes[prefix + k] for k in keys}
            sources = {k: (lambda full=prefix + k: ckpt.get(full)) for k in keys}
        if "img_in.weight" not in shapes:
            kind = _kind_of(keys)
            hint = f"; it looks like {kind}" if kind else ""
            raise UserError(f"{ckpt.name}: not a {what}: no img_in.weight{hint}")
        params = FluxParams.from_shapes(shapes, ckpt.name)
        with torch.device("meta"):
            model = Flux(params)
        if fp8:
            apply_fp8_storage(model, dtype)
        else:
            model.to(dtype)
        _check(ckpt.name, what, model.state_dict(), shapes)
        if device.type == "meta":  # header-only check: every key and shape verified, no tensor read
            return model
        _stream(model, ckpt, sources, device)
    log.info("loaded %s (%d double + %d single blocks, hidden %d, %s%s) in %.1fs", ckpt.name, params.depth,
             params.depth_single_blocks, params.hidden_size, "dev" if params.guidance_embed else "schnell",
             ", fp8 e4m3 weights" if fp8 else "", time.perf_counter() - start)
    return model


def _plan_sources(ckpt: Checkpoint, plan: dict[str, tuple[tuple[str, ...], bool]],
                  prefix: str = "") -> tuple[dict[str, tuple[int, ...]], dict[str, Callable[[], torch.Tensor]]]:
    """(shapes, readers) of the converted tensors of a diffusers checkpoint, computed without reading it."""
    shapes, sources = {}, {}
    for bfl, (srcs, swap) in plan.items():
        metas = [torch.empty(ckpt.shapes[prefix + k], device="meta") for k in srcs]
        shapes[bfl] = tuple(apply_plan_entry(metas, swap).shape)
        sources[bfl] = lambda srcs=srcs, swap=swap: apply_plan_entry([ckpt.get(prefix + k) for k in srcs], swap)
    return shapes, sources


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """Load the FLUX AE from `ae.safetensors`, an all-in-one checkpoint or a diffusers folder (or vae/)."""
    start = time.perf_counter()
    with open_checkpoint(_resolve(path, "vae", "autoencoder")) as ckpt:
        prefix, keys = _component(ckpt, _AE_PREFIXES, "encoder.conv_in.weight")
        what = "FLUX autoencoder"
        if is_diffusers_ae(keys):
            sd_meta = ae_diffusers_to_bfl({k: torch.empty(ckpt.shapes[prefix + k], device="meta") for k in keys})
            names = dict(zip(sd_meta, keys))  # the AE conversion renames one to one, in order
            shapes = {k: tuple(v.shape) for k, v in sd_meta.items()}
            sources = {bfl: (lambda d=dif, bfl=bfl: _ae_tensor(ckpt.get(prefix + d), bfl)) for bfl, dif in names.items()}
        else:
            shapes = {k: ckpt.shapes[prefix + k] for k in keys}
            sources = {k: (lambda full=prefix + k: ckpt.get(full)) for k in keys}
        if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
            kind = _kind_of(keys)
            hint = f"; it looks like {kind}" if kind else ""
            raise UserError(f"{ckpt.name}: not a {what}: no encoder.conv_in.weight / decoder.conv_in.weight{hint}")
        params = AutoEncoderParams.from_shapes(shapes, ckpt.name)
        with torch.device("meta"):
            model = AutoEncoder(params).to(dtype)
        _check(ckpt.name, what, model.state_dict(), shapes)
        if torch.device(device).type == "meta":  # header-only check, as for the transformer
            return model
        _stream(model, ckpt, sources, torch.device(device))
    log.info("loaded %s (AE ch %d x %s) in %.1fs", ckpt.name, params.ch, params.ch_mult,
             time.perf_counter() - start)
    return model


def _ae_tensor(t: torch.Tensor, bfl_key: str) -> torch.Tensor:
    """diffusers stores the mid attention's q/k/v/proj_out as Linear [c, c]; BFL as 1x1 conv [c, c, 1, 1]."""
    return t[:, :, None, None] if t.ndim == 2 and ".attn_1." in bfl_key else t
