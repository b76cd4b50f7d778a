"""Parsed kohya flags -> a frozen dataclass tree (the only form of configuration past the CLI edge).

`build_config` resolves kohya's implied settings (e.g. --cache_latents_to_disk implies --cache_latents,
--fp8_base_unet implies --fp8_base, --use_8bit_adam means AdamW8bit), then `validate` checks the hard
errors of kohya's §1.2 and ours, raising `UserError` with the flag names. Validation never mutates.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from library.data.config import DatasetFlags, dataset_flags
from library.errors import UserError
from library.train.cli import ParsedArgs, non_default_values
from library.train.flags import DATASET_FLAGS, FLAG_BY_NAME_DEFAULTS, INEFFECTIVE
from library.train.ranges import check_ranges


DEFAULT_SEED = 42  # --seed unset: a fixed seed, so every run is reproducible (kohya draws a random one)


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str | None
    clip_l: str | None
    t5xxl: str | None
    ae: str | None
    model_type: str
    t5xxl_max_token_length: int | None
    apply_t5_attn_mask: bool


@dataclass(frozen=True)
class PrecisionConfig:
    mixed_precision: str  # "no" | "fp16" | "bf16"
    full_bf16: bool
    full_fp16: bool
    fp8_base: bool
    fp8_base_unet: bool
    fp8_matmul: bool  # ours: per-row scaled e4m3 weights and fp8 forward matmuls (library/flux/model.py)
    save_precision: str | None
    no_half_vae: bool


@dataclass(frozen=True)
class ObjectiveConfig:
    """Everything library/flow.py and the loss need."""

    timestep_sampling: str
    sigmoid_scale: float
    discrete_flow_shift: float
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    model_prediction_type: str
    guidance_scale: float
    loss_type: str
    huber_c: float
    huber_schedule: str
    huber_scale: float
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool
    prior_loss_weight: float
    masked_loss: bool
    flow_from_control: bool = False  # the path runs control (σ=1) -> target (σ=0); library/flow.control_endpoint
    control_noise_std: float = 0.0  # noise std added to the control start (PMRF)
    flow_reference_tokens: bool = False  # with flow_from_control: the control also as Kontext reference tokens
    perceptual_loss_weight: float = 0.0  # VGG16 feature loss on the decoded x̂0 (0: off)
    perceptual_model: str | None = None  # VGG16 safetensors (torchvision key layout)
    perceptual_every_n_steps: int = 1

    @property
    def uses_reference_tokens(self) -> bool:
        """Control latents enter as Kontext reference tokens: always for the Kontext objective, and with
        --flow_from_control only when --flow_reference_tokens asks for them."""
        return not self.flow_from_control or self.flow_reference_tokens


@dataclass(frozen=True)
class MemoryConfig:
    gradient_checkpointing: bool
    cpu_offload_checkpointing: bool
    blocks_to_swap: int | None
    cache_latents: bool
    cache_latents_to_disk: bool
    cache_text_encoder_outputs: bool
    cache_text_encoder_outputs_to_disk: bool
    vae_batch_size: int
    text_encoder_batch_size: int | None
    skip_cache_check: bool
    gradient_checkpointing_blocks: int | None = None  # selective: only the first N blocks are recomputed
    max_vram_gib: float | None = None  # library/train/memory_plan.py picks checkpointing / fp8 / swap to fit


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str  # resolved: never "" (AdamW when unset)
    optimizer_args: tuple[str, ...]
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: tuple[float, ...]
    max_grad_norm: float


@dataclass(frozen=True)
class SchedulerConfig:
    lr_scheduler: str
    lr_scheduler_type: str
    lr_scheduler_args: tuple[str, ...]
    lr_warmup_steps: int | float
    lr_decay_steps: int | float
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_scheduler_min_lr_ratio: float | None
    lr_scheduler_timescale: int | None


@dataclass(frozen=True)
class LoopConfig:
    max_train_steps: int
    max_train_epochs: int | None
    train_batch_size: int
    gradient_accumulation_steps: int
    seed: int | None
    max_data_loader_n_workers: int
    persistent_data_loader_workers: bool
    initial_epoch: int | None
    initial_step: int | None
    skip_until_initial_step: bool


@dataclass(frozen=True)
class SpeedConfig:
    torch_compile: bool
    dynamo_backend: str
    ddp_timeout: int | None
    xformers: bool  # the transformer's attention through xformers (torch SDPA otherwise)


@dataclass(frozen=True)
class SaveConfig:
    output_dir: str
    output_name: str | None
    save_model_as: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_n_epoch_ratio: int | None
    save_last_n_epochs: int | None
    save_last_n_epochs_state: int | None
    save_last_n_steps: int | None
    save_last_n_steps_state: int | None
    save_state: bool
    save_state_on_train_end: bool
    resume: str | None
    no_metadata: bool
    training_comment: str | None
    metadata: Mapping[str, str]  # metadata_* flags that were set, without the prefix


@dataclass(frozen=True)
class SampleConfig:
    sample_prompts: str | None
    sample_every_n_steps: int | None
    sample_every_n_epochs: int | None
    sample_at_first: bool
    eval_clip_model: str | None = None  # score the sample images (library/eval/sample_scores.py)
    eval_reference_dir: str | None = None
    eval_class_token_map: tuple[str, ...] | list[str] | None = None


@dataclass(frozen=True)
class LogConfig:
    logging_dir: str | None
    log_with: str | None
    log_tracker_name: str | None
    wandb_run_name: str | None
    log_tracker_config: str | None
    wandb_api_key: str | None
    log_config: bool
    console_log_level: str | None
    console_log_file: str | None
    console_log_simple: bool


@dataclass(frozen=True)
class NetworkConfig:
    network_module: str
    network_dim: int | None
    network_alpha: float
    network_dropout: float | None
    network_args: tuple[str, ...]
    network_weights: str | None
    dim_from_weights: bool
    network_train_unet_only: bool
    network_train_text_encoder_only: bool
    scale_weight_norms: float | None
    base_weights: tuple[str, ...]
    base_weights_multiplier: tuple[float, ...]


@dataclass(frozen=True)
class ValidationConfig:
    validation_seed: int | None
    validation_split: float  # read by the dataset layer (its CLI level); here for the record
    validate_every_n_steps: int | None
    validate_every_n_epochs: int | None
    max_validation_steps: int | None


@dataclass(frozen=True)
class DataConfig:
    dataset_config: str | None  # the dataset TOML/JSON (or None: kohya's folder mode)
    # The dataset flags the user gave, typed once by `_data_config` (the implied ones resolved there:
    # --caption_extention fills caption_extension, --cache_latents_to_disk sets cache_latents).
    flags: DatasetFlags
    train_data_dir: str | None  # kohya's folder mode: <repeats>_<class tokens> sub-folders
    reg_data_dir: str | None
    in_json: str | None  # accepted and ignored with --dataset_config, as in kohya
    skip_bad_images: bool  # skip unreadable images with a warning instead of stopping
    validate_config: bool
    dry_run: bool
    pair_side: str = "after"  # subsets with before_dir: train on the after or the before images (differential)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    precision: PrecisionConfig
    objective: ObjectiveConfig
    memory: MemoryConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    loop: LoopConfig
    speed: SpeedConfig
    save: SaveConfig
    sample: SampleConfig
    log: LogConfig
    network: NetworkConfig
    data: DataConfig
    validation: ValidationConfig
    warnings: tuple[str, ...] = field(default=())
    effective: Mapping[str, Any] = field(default_factory=dict)  # non-default values, as --output_config


def _take(cls: type, values: Mapping[str, Any], **overrides: Any) -> Any:
    """Build a dataclass from the same-named parsed values, with explicit overrides."""
    kwargs = {f.name: values[f.name] for f in fields(cls) if f.name not in overrides and f.name in values}
    return cls(**kwargs, **overrides)


_OPTIMIZER_ALIASES = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


def _optimizer_type(v: Mapping[str, Any]) -> str:
    if v["optimizer_type"]:
        return v["optimizer_type"]
    for flag, name in _OPTIMIZER_ALIASES.items():
        if v[flag]:
            return name
    return "AdamW"


def _resolve(v: dict[str, Any]) -> dict[str, Any]:
    """kohya's implied settings (§1.2), applied to a copy of the values."""
    v = dict(v)
    if v["caption_extention"] and v["caption_extension"] == FLAG_BY_NAME_DEFAULTS["caption_extension"]:
        v["caption_extension"] = v["caption_extention"]
    v["cache_latents"] = v["cache_latents"] or v["cache_latents_to_disk"]
    v["cache_text_encoder_outputs"] = v["cache_text_encoder_outputs"] or v["cache_text_encoder_outputs_to_disk"]
    v["fp8_base"] = v["fp8_base"] or v["fp8_base_unet"]
    if v["split_mode"] and v["blocks_to_swap"] is None:
        v["blocks_to_swap"] = 18
    if v["huber_schedule"] == "snr":
        pass  # implemented for flow matching in library/flow.huber_c_for (kohya raises here)
    return v


def build_config(parsed: ParsedArgs) -> TrainConfig:
    check_ranges(parsed.values)
    v = _resolve(parsed.values)
    given = parsed.given
    cfg = TrainConfig(
        model=_take(ModelConfig, v),
        precision=_take(PrecisionConfig, v),
        objective=_take(ObjectiveConfig, v),
        memory=_take(MemoryConfig, v),
        optimizer=_take(
            OptimizerConfig, v,
            optimizer_type=_optimizer_type(v),
            optimizer_args=tuple(v["optimizer_args"] or ()),
            text_encoder_lr=tuple(v["text_encoder_lr"] or ()),
        ),
        scheduler=_take(SchedulerConfig, v, lr_scheduler_args=tuple(v["lr_scheduler_args"] or ())),
        loop=_take(LoopConfig, v),
        speed=_take(SpeedConfig, v),
        save=_take(
            SaveConfig, v,
            output_dir=v["output_dir"] or "output",
            save_model_as=v["save_model_as"] or "safetensors",
            metadata={k[len("metadata_"):]: v[k] for k in v if k.startswith("metadata_") and v[k] is not None},
        ),
        sample=_take(SampleConfig, v),
        log=_take(LogConfig, v),
        network=_take(
            NetworkConfig, v,
            network_module=v["network_module"] or "networks.lora_flux",
            network_args=tuple(v["network_args"] or ()),
            base_weights=tuple(v["base_weights"] or ()),
            base_weights_multiplier=tuple(v["base_weights_multiplier"] or ()),
        ),
        data=_data_config(v, given),
        validation=_take(ValidationConfig, v),
        warnings=tuple(ineffective_warnings(v, given)),
        effective=non_default_values(parsed),
    )
    validate(cfg)
    return cfg


_FOLDER_FLAGS = ("train_data_dir", "reg_data_dir", "in_json", "skip_bad_images")  # typed fields of DataConfig


def _data_config(v: Mapping[str, Any], given: frozenset[str]) -> DataConfig:
    """The data part of the tree from resolved values (`_resolve`): the only place implied flags are resolved
    and the only place the dataset flags' raw values are read (library.data.config.dataset_flags types them)."""
    names = set(given & DATASET_FLAGS) - set(_FOLDER_FLAGS)
    if "caption_extention" in names:
        names.discard("caption_extention")
        names.add("caption_extension")  # resolved by _resolve (the explicit spelling wins)
    if "cache_latents_to_disk" in names:
        names.discard("cache_latents_to_disk")
        names.add("cache_latents")
    return DataConfig(dataset_config=v["dataset_config"], flags=dataset_flags({k: v[k] for k in sorted(names)}),
                      train_data_dir=v["train_data_dir"], reg_data_dir=v["reg_data_dir"], in_json=v["in_json"],
                      skip_bad_images=bool(v["skip_bad_images"]), validate_config=v["validate_config"],
                      dry_run=v["dry_run"])


def ineffective_warnings(values: Mapping[str, Any], given: frozenset[str]) -> list[str]:
    """One line per set flag that does nothing for FLUX, naming the flag and why."""
    out = []
    for name, why in INEFFECTIVE.items():
        if name in given and values[name] != FLAG_BY_NAME_DEFAULTS[name]:
            out.append(f"--{name} has no effect for FLUX: {why}")
    if "split_mode" in given:
        out.append("--split_mode is deprecated: use --blocks_to_swap (18 blocks are swapped)")
    if values["model_prediction_type"] == "sigma_scaled":
        out.append(
            "--model_prediction_type sigma_scaled (kohya's default): the x0 estimate is compared with the "
            "latents (kohya compares it with the velocity); --model_prediction_type raw is recommended"
        )
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"command line: {message}")


def validate(cfg: TrainConfig) -> None:
    """Hard errors (kohya §1.2 plus ours). Checks only; never changes the config."""
    p, m, o, loop = cfg.precision, cfg.memory, cfg.objective, cfg.loop
    _require(not (m.blocks_to_swap and m.cpu_offload_checkpointing),
             "--blocks_to_swap and --cpu_offload_checkpointing cannot be combined; pick one")
    _require(m.blocks_to_swap is None or 0 <= m.blocks_to_swap <= 35, "--blocks_to_swap must be in 0..35")
    _require(m.gradient_checkpointing_blocks is None or m.gradient_checkpointing_blocks >= 0,
             "--gradient_checkpointing_blocks must be 0 or more (FLUX has 57 blocks)")
    _require(not (m.gradient_checkpointing_blocks is not None and m.cpu_offload_checkpointing),
             "--gradient_checkpointing_blocks cannot be combined with --cpu_offload_checkpointing")
    _require(m.max_vram_gib is None or (math.isfinite(m.max_vram_gib) and 1 <= m.max_vram_gib <= 4096),
             "--max_vram_gib must be a number of GiB between 1 and 4096")
    _require(not (m.max_vram_gib is not None and m.cpu_offload_checkpointing),
             "--max_vram_gib cannot be combined with --cpu_offload_checkpointing")
    _require(not (p.full_bf16 and p.mixed_precision != "bf16"), "--full_bf16 needs --mixed_precision bf16")
    _require(not (p.full_fp16 and p.mixed_precision != "fp16"), "--full_fp16 needs --mixed_precision fp16")
    _require(not (p.fp8_matmul and p.mixed_precision != "bf16"),
             "--fp8_matmul needs --mixed_precision bf16 (the fp8 matmuls write bf16)")
    _require(not (p.fp8_base and p.mixed_precision == "no"),
             "--fp8_base needs --mixed_precision bf16 or fp16 (fp8 weights are upcast for compute)")
    _require(not (cfg.model.model_type == "chroma"), "--model_type chroma is not supported; use flux")
    _require(loop.train_batch_size >= 1, "--train_batch_size must be at least 1")
    _require(loop.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1")
    _require(loop.max_train_steps >= 1 or (loop.max_train_epochs or 0) >= 1, "--max_train_steps must be positive")
    _require(loop.initial_step is None or loop.initial_step < loop.max_train_steps or loop.max_train_epochs is not None,
             "--initial_step must be smaller than --max_train_steps")
    _require(o.huber_c > 0, "--huber_c must be positive")
    _require(cfg.optimizer.learning_rate > 0, "--learning_rate must be positive")
    _require(cfg.scheduler.lr_scheduler_num_cycles >= 1, "--lr_scheduler_num_cycles must be at least 1")
    _require(cfg.network.network_module == "networks.lora_flux",
             f"--network_module {cfg.network.network_module}: only networks.lora_flux is supported")
    _require(not (cfg.network.network_train_unet_only and cfg.network.network_train_text_encoder_only),
             "--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    _require(len(cfg.optimizer.text_encoder_lr) <= 2, "--text_encoder_lr takes one or two values (CLIP-L [T5])")
    for name in ("save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs",
                 "save_last_n_steps"):
        value = getattr(cfg.save, name)
        _require(value is None or value >= 1, f"--{name} must be at least 1")
    _require(0 <= o.control_noise_std < float("inf"),
             "--control_noise_std must be a finite number >= 0")
    _require(not ((o.control_noise_std or o.flow_reference_tokens) and not o.flow_from_control),
             "--control_noise_std and --flow_reference_tokens need --flow_from_control")
    _require(0 <= o.perceptual_loss_weight < float("inf"), "--perceptual_loss_weight must be a finite number >= 0")
    _require(o.perceptual_every_n_steps >= 1, "--perceptual_every_n_steps must be at least 1")
    _require(not (o.perceptual_loss_weight > 0 and not o.perceptual_model),
             "--perceptual_loss_weight needs --perceptual_model FILE (VGG16 weights in torchvision's key layout, "
             ".safetensors; nothing is downloaded)")
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(cfg.sample, name)
        _require(value is None or value >= 1, f"--{name} must be at least 1")
    name = cfg.save.output_name
    _require(name is None or (name not in ("", ".", "..") and "/" not in name and "\\" not in name
                              and not name.startswith(".")),
             f"--output_name {name!r}: must be a plain file name (no folders, not hidden): every output goes into "
             "--output_dir; put the folder there instead")


def config_as_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The whole resolved tree as plain JSON-able data (printed at start, saved beside the outputs)."""
    tree = dataclasses.asdict(cfg)
    tree.pop("effective", None)
    tree.pop("warnings", None)
    if tree["log"].get("wandb_api_key"):
        tree["log"]["wandb_api_key"] = "***"
    return json.loads(json.dumps(tree, default=str))


def _on(**flags: Any) -> str:
    """The names of the truthy options, as `name` or `name=value` (non-bool values)."""
    items = [k if v is True else f"{k}={v}" for k, v in flags.items() if v not in (None, False, 0, "")]
    return ", ".join(items) or "defaults"


def config_summary(cfg: TrainConfig) -> str:
    """A few readable lines printed at the start of training (the full tree is saved as *_config.json)."""
    m, n, o, s, loop, mem = cfg.model, cfg.network, cfg.optimizer, cfg.scheduler, cfg.loop, cfg.memory
    length = f"{loop.max_train_epochs} epochs" if loop.max_train_epochs else f"{loop.max_train_steps} steps"
    lrs = f"lr {o.learning_rate:g}" + (f", unet_lr {o.unet_lr:g}" if o.unet_lr is not None else "") + \
        (f", text_encoder_lr {','.join(f'{x:g}' for x in o.text_encoder_lr)}" if o.text_encoder_lr else "")
    rank = "from --network_weights" if n.dim_from_weights else f"dim {n.network_dim or 4}, alpha {n.network_alpha:g}"
    parts = "transformer only" if n.network_train_unet_only else \
        "text encoder only" if n.network_train_text_encoder_only else "transformer + CLIP-L"
    lines = {
        "transformer": str(m.pretrained_model_name_or_path),
        "encoders": f"CLIP-L {m.clip_l}, T5-XXL {m.t5xxl}, AE {m.ae}",
        "dataset": cfg.data.dataset_config or f"folders under {cfg.data.train_data_dir}",
        "network": f"{n.network_module} {rank}, {parts}"
                   + (f", args {' '.join(n.network_args)}" if n.network_args else "")
                   + (f", weights {n.network_weights}" if n.network_weights else ""),
        "optimizer": f"{o.optimizer_type}, {lrs}" + (f", args {' '.join(o.optimizer_args)}" if o.optimizer_args
                                                    else ""),
        "schedule": f"{length}, gradient accumulation {loop.gradient_accumulation_steps}, {s.lr_scheduler} "
                    f"(warmup {s.lr_warmup_steps}), seed {loop.seed if loop.seed is not None else DEFAULT_SEED}",
        "objective": f"{cfg.objective.timestep_sampling} timesteps, {cfg.objective.model_prediction_type} "
                     f"prediction, {cfg.objective.loss_type} loss",
        "precision": _on(mixed_precision=cfg.precision.mixed_precision, full_bf16=cfg.precision.full_bf16,
                         full_fp16=cfg.precision.full_fp16, fp8_base=cfg.precision.fp8_base,
                         fp8_matmul=cfg.precision.fp8_matmul, save_precision=cfg.precision.save_precision),
        "memory/speed": _on(gradient_checkpointing=mem.gradient_checkpointing,
                            cpu_offload_checkpointing=mem.cpu_offload_checkpointing,
                            blocks_to_swap=mem.blocks_to_swap,
                            gradient_checkpointing_blocks=mem.gradient_checkpointing_blocks,
                            max_vram_gib=mem.max_vram_gib, cache_latents=mem.cache_latents,
                            cache_latents_to_disk=mem.cache_latents_to_disk,
                            cache_text_encoder_outputs=mem.cache_text_encoder_outputs,
                            cache_text_encoder_outputs_to_disk=mem.cache_text_encoder_outputs_to_disk,
                            torch_compile=cfg.speed.torch_compile, xformers=cfg.speed.xformers),
        "output": f"{cfg.save.output_dir}/{cfg.save.output_name or 'last'}.{cfg.save.save_model_as}"
                  + (f", every {cfg.save.save_every_n_steps} steps" if cfg.save.save_every_n_steps else "")
                  + (f", every {cfg.save.save_every_n_epochs} epochs" if cfg.save.save_every_n_epochs else "")
                  + (", with state" if cfg.save.save_state else ""),
    }
    return "configuration:\n" + "\n".join(f"  {k:<13}{v}" for k, v in lines.items())
