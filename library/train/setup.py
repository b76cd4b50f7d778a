"""Everything before the first step: accelerator, data, caches, models, LoRA, optimizer, scheduler.

`setup` returns a `Run`, the plain bag of objects the loop in trainer.py uses. Order:
accelerator -> data (scan, buckets) -> models -> caches (latents, text) -> sample prompts encoded ->
unneeded encoders freed -> LoRA injected -> memory/speed options -> optimizer, scheduler -> prepare.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
import torch

from library.atomic import write_text_atomic
from library.data.config import load_dataset_config
from library.data.dataset import BatchLoader, FluxDataset, build_datasets
from library.errors import UserError
from library.objective import objective_of_training
from library.schedule import Schedule, epochs_from, make_schedule
from library.train import models as M
from library.train.caching import Ranks, cache_before_training
from library.train.checkpoint import Names, convert_loader_position, saved_position
from library.train.cli import write_toml_atomic
from library.train.config import DEFAULT_SEED, TrainConfig, config_as_dict, config_summary
from library.train.legacy_data import write_folder_mode_config
from library.train.memory_setup import apply_max_vram
from library.train.optim import build_optimizer, build_scheduler, is_relative_step_adafactor
from library.train.perceptual import build_perceptual
from library.train.precision import Dtypes, resolve_dtypes
from library.train.preflight import preflight
from library.train.prompts import load_prompts
from library.train.reporting import warn
from library.train.samples import EncodedPrompt, encode_prompts, pair_prompts
from networks.lora_flux import LoRANetwork
from networks.lora_metadata import build_kohya_metadata

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What the loop needs, built by `setup` in order; nothing here is replaced after setup returns."""

    cfg: TrainConfig
    accelerator: Accelerator
    dtypes: Dtypes
    seed: int
    dataset: FluxDataset
    loader: BatchLoader
    models: M.Models
    network: LoRANetwork
    train_clip: bool
    optimizer: torch.optim.Optimizer  # accelerate's AcceleratedOptimizer (a subclass)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    names: Names
    out_dir: Path
    schedule: Schedule
    prompts: list[EncodedPrompt]
    metadata: dict[str, str]
    val_loader: BatchLoader | None = None  # over the validation_split images
    perceptual: Any = None  # library.train.perceptual.PerceptualLoss with --perceptual_loss_weight > 0

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def num_epochs(self) -> int:
        return self.schedule.epochs

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    log_with = cfg.log.log_with or ("tensorboard" if cfg.log.logging_dir else None)
    trackers = ["tensorboard", "wandb"] if log_with == "all" else ([log_with] if log_with else None)
    if trackers and "wandb" in trackers:
        try:
            import wandb  # noqa: F401, PLC0415
        except ImportError:
            raise UserError("command line: --log_with wandb: wandb is not installed (pip install wandb)") from None
    kwargs = [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg.speed.ddp_timeout))] \
        if cfg.speed.ddp_timeout else []
    # Several processes on a machine without GPUs (accelerate launch --multi_gpu on CPU): gloo, data parallel.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Gradient accumulation and the LR schedule are stepped by the trainer itself (resumable, exact).
    return Accelerator(mixed_precision=cfg.precision.mixed_precision, log_with=trackers, cpu=cpu_ddp,
                       project_dir=cfg.log.logging_dir or cfg.save.output_dir, kwargs_handlers=kwargs)


def _data(cfg: TrainConfig, acc: Accelerator, seed: int) -> tuple[FluxDataset, FluxDataset | None]:
    path = cfg.data.dataset_config
    data = cfg.data
    if not path:
        folder, reg = data.train_data_dir, data.reg_data_dir
        if not folder:
            raise UserError("command line: --dataset_config PATH (a kohya dataset TOML, see dataset_configs/) "
                            "or --train_data_dir with <repeats>_<class tokens> sub-folders is required")
        name = cfg.save.output_name or "last"
        target = Path(cfg.save.output_dir) / f"{name}_dataset.toml"
        path = str(write_folder_mode_config(folder, reg, target) if acc.is_main_process else target)
        acc.wait_for_everyone()
    elif data.train_data_dir or data.reg_data_dir or data.in_json:
        warn("--train_data_dir/--reg_data_dir/--in_json are ignored when --dataset_config is given (as in kohya)")
    resolved = load_dataset_config(path, data.flags)
    if cfg.data.pair_side != resolved.pair_side:  # a differential run's stage 1 trains on the before images
        resolved = dataclasses.replace(resolved, pair_side=cfg.data.pair_side)
    dataset, validation = build_datasets(resolved, seed, data.skip_bad_images, progress=acc.is_main_process)
    if len(_loader(cfg, acc, dataset)) == 0:
        raise UserError(f"{cfg.data.dataset_config}: no images found in any subset")
    return dataset, validation


def _loader(cfg: TrainConfig, acc: Accelerator, dataset: FluxDataset) -> BatchLoader:
    # kohya caps the workers at the CPU count; --persistent_data_loader_workers keeps one pool for all epochs.
    workers = min(cfg.loop.max_data_loader_n_workers, max(0, (os.cpu_count() or 1) - 1))
    return BatchLoader(dataset, workers, acc.process_index, acc.num_processes,
                       persistent_workers=cfg.loop.persistent_data_loader_workers)


def run_schedule(cfg: TrainConfig, batches_per_rank: int) -> Schedule:
    """The run's steps and epochs (library.schedule, shared with --dry_run) for this rank's batch count."""
    loop, save = cfg.loop, cfg.save
    return make_schedule(batches_per_rank, loop.gradient_accumulation_steps, loop.max_train_steps,
                         loop.max_train_epochs, save.save_every_n_epochs, save.save_n_epoch_ratio)


def _resumed(cfg: TrainConfig, schedule: Schedule, batches_per_rank: int, world: int) -> Schedule:
    """The epochs a resumed run enters: a state of another number of processes has other steps per epoch
    (and the text-encoder cache must cover the epochs that will actually run)."""
    if not all(Path(cfg.save.resume, f).is_file() for f in ("train_state.json", "rng.pt")):
        return schedule  # not a whole state: trainer.resume names what is missing
    position, saved_world, step = saved_position(cfg.save.resume)
    position, _ = convert_loader_position(position, saved_world, world)
    epochs = epochs_from(schedule, batches_per_rank, cfg.loop.gradient_accumulation_steps, int(position["epoch"]),
                         int(position["index"]), step)
    return dataclasses.replace(schedule, epochs=epochs)


def _train_clip(cfg: TrainConfig) -> bool:
    n = cfg.network
    if n.network_train_unet_only:
        return False
    if cfg.memory.cache_text_encoder_outputs:
        warn("CLIP-L LoRA training needs live text encoding, but --cache_text_encoder_outputs is set: training "
             "the transformer LoRA only (add --network_train_unet_only to silence this)")
        return False
    return True


def setup(cfg: TrainConfig, after_preflight: Callable[[], None] | None = None) -> Run:
    """`after_preflight` runs once the checks passed, before anything is written (the output-folder lock)."""
    dtypes = resolve_dtypes(cfg.precision)
    preflight(cfg, dtypes)  # flags, folders and model-file headers: fail in a second, not after loading
    if after_preflight is not None:
        after_preflight()
    acc = make_accelerator(cfg)
    if acc.device.type == "cpu" and cfg.precision.mixed_precision == "fp16":
        raise UserError("command line: --mixed_precision fp16 needs a GPU (CPU autocast has no fp16); "
                        "use bf16 or no on the CPU")
    seed = cfg.loop.seed if cfg.loop.seed is not None else DEFAULT_SEED
    torch.manual_seed(seed)  # LoRA init (kaiming) is identical on every rank and every run
    out_dir = Path(cfg.save.output_dir)
    if acc.is_main_process:
        _write_config(cfg, out_dir)
    dataset, validation = _data(cfg, acc, seed)
    # --max_vram_gib: checkpointing / fp8 / block swap chosen from the memory model before the model loads.
    cfg, dtypes = apply_max_vram(cfg, dtypes, dataset.cfg.datasets)
    batches_per_rank = len(_loader(cfg, acc, dataset))
    schedule = run_schedule(cfg, batches_per_rank)
    if cfg.save.resume:
        schedule = _resumed(cfg, schedule, batches_per_rank, acc.num_processes)
    total, epochs = schedule.total_steps, schedule.epochs
    dataset = dataset.replace(max_train_steps=total)  # captions' fractional token_warmup_step
    train_clip = _train_clip(cfg)
    prompts_spec = _load_prompts(cfg)
    t_load = time.perf_counter()
    models = M.load_models(cfg, dtypes, acc.device, need_text=True, need_ae=True)
    t_cache = time.perf_counter()
    ranks = Ranks.of(acc)
    dataset, _ = cache_before_training(cfg, ranks, models, dataset, epochs, dtypes, acc.device, acc.is_main_process)
    t_cached = time.perf_counter()
    loader = _loader(cfg, acc, dataset)  # over the cached dataset (and without the images caching skipped)
    val_loader = None
    if validation is not None:
        validation, _ = cache_before_training(cfg, ranks, models, validation, 1, dtypes, acc.device,
                                              acc.is_main_process)
        val_loader = BatchLoader(validation, 0, acc.process_index, acc.num_processes)
    pairs = None
    if not prompts_spec and _wants_samples(cfg):  # a control/degradation dataset: sample its first pairs
        prompts_spec, pairs = pair_prompts(dataset)
    prompts = encode_prompts(prompts_spec, models.text, models.t5_max_length, cfg.model.apply_t5_attn_mask, pairs)
    if cfg.memory.cache_text_encoder_outputs and not train_clip:
        M.free(models.text.clip, models.text.t5)
        models.text = None
    perceptual = None
    if cfg.objective.perceptual_loss_weight > 0:  # the AE stays: x̂0 and the target are decoded at the step
        perceptual = build_perceptual(cfg.objective.perceptual_model, models.ae)
    if cfg.memory.cache_latents and not prompts and perceptual is None:
        M.free(models.ae)
        models.ae = None
    M.merge_base_weights(cfg, models)
    if dtypes.fp8_matmul:  # after the merge (bf16 weights), before the LoRA wraps the Linears
        M.quantize_fp8_matmul(models.transformer, acc.device)
    # The LoRA is injected while the transformer is still in host memory (so its initial weights do not depend
    # on the device), then moves with it: block swap must see the wrapped blocks to keep only frozen weights.
    torch.manual_seed(seed)
    network, names_replaced = M.inject_lora(cfg, models, train_clip, dtypes)
    log.info("LoRA: %d modules wrapped, %d trainable parameters", len(names_replaced),
             sum(p.numel() for p in network.parameters() if p.requires_grad))
    t_move = time.perf_counter()
    M.transformer_to_device(cfg, models.transformer, acc.device)
    _sync(acc.device)
    t_moved = time.perf_counter()
    M.apply_memory_and_speed(cfg, models.transformer, acc.device)
    # Start-up parts (the first step's own time, compilation included, is logged by the trainer).
    log.info("setup: models loaded in %.1f s, caches %.1f s, transformer to %s in %.1f s",
             t_cache - t_load, t_cached - t_cache, acc.device.type, t_moved - t_move)
    optimizer = build_optimizer(M.optimizer_groups(cfg, network), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total, cfg.optimizer.learning_rate,
                                is_relative_step_adafactor(cfg.optimizer))
    optimizer = acc.prepare(optimizer)
    ext = "." + cfg.save.save_model_as
    return Run(cfg, acc, dtypes, seed, dataset, loader, models, network, train_clip, optimizer, scheduler,
               Names(out_dir, cfg.save.output_name, ext), out_dir, schedule, prompts,
               _metadata(cfg, models, network, dataset, total, epochs, seed), val_loader, perceptual)


def _wants_samples(cfg: TrainConfig) -> bool:
    s = cfg.sample
    return bool(s.sample_every_n_steps or s.sample_every_n_epochs or s.sample_at_first)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_prompts(cfg: TrainConfig) -> list:
    if not cfg.sample.sample_prompts:
        return []
    return load_prompts(cfg.sample.sample_prompts)


def _write_config(cfg: TrainConfig, out_dir: Path) -> None:
    """Save the effective configuration beside the outputs (JSON tree + re-runnable TOML) and print a
    short summary of it that names the saved file."""
    tree = config_as_dict(cfg)
    name = cfg.save.output_name or "last"
    target = write_text_atomic(out_dir / f"{name}_config.json", json.dumps(tree, indent=1))
    write_toml_atomic(out_dir / f"{name}_args.toml", {k: v for k, v in cfg.effective.items()})
    print(config_summary(cfg) + f"\n  full configuration: {target}", flush=True)


def datasets_metadata(dataset: FluxDataset) -> list[dict]:
    """kohya's `ss_datasets` (train_network.py's dataset and subset fields, image_dir as a basename), plus
    `caption_extension` per subset, which kohya does not record: the study report compares caption strategies
    by it (library/eval/report.py)."""
    counts: dict[tuple[int, int], int] = {}
    for it in (it for its in dataset.items for it in its):
        counts[it.dataset, it.subset] = counts.get((it.dataset, it.subset), 0) + 1
    out = []
    for i, ds in enumerate(dataset.cfg.datasets):
        subsets = []
        for j, sub in enumerate(ds.subsets):
            entry = {"img_count": counts.get((i, j), 0), "num_repeats": sub.num_repeats, "color_aug": sub.color_aug,
                     "flip_aug": sub.flip_aug, "random_crop": sub.random_crop, "shuffle_caption": sub.shuffle_caption,
                     "keep_tokens": sub.keep_tokens, "keep_tokens_separator": sub.keep_tokens_separator,
                     "secondary_separator": sub.secondary_separator, "enable_wildcard": sub.enable_wildcard,
                     "caption_prefix": sub.caption_prefix, "caption_suffix": sub.caption_suffix,
                     "resize_interpolation": sub.resize_interpolation,
                     "image_dir": sub.image_dir.name if sub.image_dir else None,
                     "caption_extension": sub.caption_extension}
            entry.update({"metadata_file": sub.metadata_file.name} if sub.metadata_file else
                         {"class_tokens": sub.class_tokens, "is_reg": sub.is_reg})
            subsets.append(entry)
        n_reg = sum(counts.get((i, j), 0) for j, sub in enumerate(ds.subsets) if sub.is_reg)
        out.append({"is_dreambooth": ds.style != "finetune", "batch_size_per_device": ds.batch_size,
                    "num_train_images": sum(counts.get((i, j), 0) for j in range(len(ds.subsets))) - n_reg,
                    "num_reg_images": n_reg, "resolution": list(ds.resolution), "enable_bucket": ds.enable_bucket,
                    "min_bucket_reso": ds.min_bucket_reso, "max_bucket_reso": ds.max_bucket_reso,
                    "resize_interpolation": ds.resize_interpolation, "subsets": subsets})
    return out


def _metadata(cfg: TrainConfig, models: M.Models, network: LoRANetwork, dataset: FluxDataset, total: int,
              epochs: int, seed: int) -> dict[str, str]:
    ds = dataset.cfg.datasets[0]
    training = {"learning_rate": cfg.optimizer.learning_rate, "unet_lr": cfg.optimizer.unet_lr,
                "text_encoder_lr": list(cfg.optimizer.text_encoder_lr), "max_train_steps": total,
                "num_epochs": epochs, "seed": seed, "optimizer": cfg.optimizer.optimizer_type,
                "lr_scheduler": cfg.scheduler.lr_scheduler, "mixed_precision": cfg.precision.mixed_precision,
                "timestep_sampling": cfg.objective.timestep_sampling,
                "model_prediction_type": cfg.objective.model_prediction_type,
                "discrete_flow_shift": cfg.objective.discrete_flow_shift,
                "guidance_scale": cfg.objective.guidance_scale, "training_comment": cfg.save.training_comment,
                "output_name": cfg.save.output_name, "apply_t5_attn_mask": cfg.model.apply_t5_attn_mask,
                "network_train_unet_only": cfg.network.network_train_unet_only,
                "datasets": datasets_metadata(dataset)}
    first = network.adapters()[0]  # the file's rank/alpha with --dim_from_weights, else the flags'
    dim, alpha = (first.rank, float(first.alpha)) if cfg.network.dim_from_weights else \
        (cfg.network.network_dim or 4, cfg.network.network_alpha)
    md = build_kohya_metadata(dim, alpha,
                                dict(M.network_kwargs(cfg)) or None, title=cfg.save.metadata.get("title") or
                                cfg.save.output_name or "LoRA", schnell=not models.guidance_embed,
                                resolution=ds.resolution, training={k: v for k, v in training.items() if v is not None},
                                no_metadata=cfg.save.no_metadata,
                                modelspec_extra={k: v for k, v in cfg.save.metadata.items() if k != "title"})
    o = cfg.objective  # written even with --no_metadata: inference and flux_restore.py honour it
    return {**md, **objective_of_training(o.flow_from_control, o.control_noise_std,
                                          o.flow_reference_tokens).to_metadata()}
