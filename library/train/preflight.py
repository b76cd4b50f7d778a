"""Checks that run first in `setup`, before the image scan and any model load, so a wrong flag or file
fails in a second with one line instead of minutes later: output folders, every model file (from its
header only), the LoRA files to start from or merge, --network_args and --optimizer_type/--optimizer_args.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from library.data.config import load_dataset_config
from library.errors import UserError
from library.flux.loading import load_autoencoder, load_transformer
from library.flux.text_encoders import load_clip_l, load_t5xxl
from library.train import checkpoint as C
from library.train.config import TrainConfig
from library.train.models import network_kwargs, required_path  # the load's "is required" message
from library.train.optim import check_optimizer
from library.train.precision import Dtypes
from library.train.prompts import load_prompts
from library.train.resume_settings import check_optimizer_matches, reconstruct_settings
from library.vision.vgg import load_vgg16
from networks.lora_args import parse_network_args
from networks.lora_formats import read_lora


def check_output_folder(path: str | None, flag: str) -> None:
    """`path` is a folder, or can be created as one (its nearest existing ancestor is a writable folder)."""
    if not path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"command line: --{flag} {path}: exists and is not a folder")
    ancestor = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise UserError(f"command line: --{flag} {path}: {ancestor} is not a folder, cannot create it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"command line: --{flag} {path}: {ancestor} is not writable")


def check_model_files(cfg: TrainConfig, dtypes: Dtypes) -> torch.nn.Module:
    """Every model file's keys and shapes from its header (nothing read); returns the meta transformer."""
    m = cfg.model
    transformer = load_transformer(required_path(m.pretrained_model_name_or_path, "pretrained_model_name_or_path"),
                                   "meta", dtypes.compute)
    load_clip_l(required_path(m.clip_l, "clip_l"), "meta", dtypes.text)
    load_t5xxl(required_path(m.t5xxl, "t5xxl"), "meta", dtypes.text)
    load_autoencoder(required_path(m.ae, "ae"), "meta", dtypes.ae)
    return transformer


def check_network_args(cfg: TrainConfig, transformer: torch.nn.Module) -> None:
    """--network_args keys and values, with the block counts of the actual transformer."""
    n_double = len(getattr(transformer, "double_blocks", []))
    n_single = len(getattr(transformer, "single_blocks", []))
    parse_network_args(network_kwargs(cfg), n_double, n_single)


def check_lora_files(cfg: TrainConfig) -> None:
    """--network_weights and --base_weights parse as LoRA files (they are small: read them whole)."""
    for path in [cfg.network.network_weights, *cfg.network.base_weights]:
        if path:
            read_lora(path)  # nan/inf tensors included


def check_sample_prompts(cfg: TrainConfig) -> None:
    """--sample_prompts: every line's values and --ci images are checked now, not at the first sampling."""
    if cfg.sample.sample_prompts:
        load_prompts(cfg.sample.sample_prompts)


def data_folders(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """(where, folder) of every image/conditioning folder the run reads (an unreadable config: none; the data
    stage reports it)."""
    data = cfg.data
    out = [(f"--{k}", Path(folder)) for k, folder in (("train_data_dir", data.train_data_dir),
                                                       ("reg_data_dir", data.reg_data_dir)) if folder]
    if data.dataset_config:
        quiet = logging.getLogger(load_dataset_config.__module__)  # its warnings print once, at the data stage
        quiet.disabled, was = True, quiet.disabled
        try:
            resolved = load_dataset_config(data.dataset_config, data.flags, check_paths=False)
        except UserError:
            return out
        finally:
            quiet.disabled = was
        for i, d in enumerate(resolved.datasets):
            for j, sub in enumerate(d.subsets):
                for key in ("image_dir", "conditioning_data_dir"):
                    if getattr(sub, key) is not None:
                        out.append((f"{cfg.data.dataset_config}: datasets[{i}].subsets[{j}].{key}",
                                    Path(getattr(sub, key))))
    return out


def check_output_outside_data(cfg: TrainConfig) -> None:
    """The outputs (loss plot, samples) must not land where images are read: a later run would train on them."""
    out = Path(cfg.save.output_dir).absolute().resolve()
    for where, folder in data_folders(cfg):
        f = folder.absolute().resolve()
        if out == f or f in out.parents:
            raise UserError(f"command line: --output_dir {cfg.save.output_dir} is inside the image folder {folder} "
                            f"({where}); the trainer's plots and samples would become training images: choose an "
                            "output folder outside the dataset")


def check_resume(cfg: TrainConfig) -> None:
    """--resume: every file of the state folder reads (a LoRA's state is small) and it was trained with this
    optimizer, before any model is loaded."""
    if cfg.save.resume:
        ts = C.load_state(cfg.save.resume).train_state
        saved = ts.get("settings") or reconstruct_settings(cfg.save.resume, ts)[0]
        check_optimizer_matches(saved, cfg.optimizer.optimizer_type, cfg.save.resume)


def preflight(cfg: TrainConfig, dtypes: Dtypes) -> None:
    check_output_folder(cfg.save.output_dir, "output_dir")
    check_output_folder(cfg.log.logging_dir, "logging_dir")
    check_output_outside_data(cfg)
    check_optimizer(cfg.optimizer)  # cheapest first: no file is opened
    check_resume(cfg)
    check_lora_files(cfg)
    check_sample_prompts(cfg)
    if cfg.objective.perceptual_loss_weight > 0:  # a file that is not VGG16: one line now, not after caching
        load_vgg16(cfg.objective.perceptual_model, "cpu")
    check_network_args(cfg, check_model_files(cfg, dtypes))
