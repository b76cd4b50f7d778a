"""The training loop: setup, then `for step: forward/backward -> optimizer step -> log -> sample -> save`.

Multi-process (accelerate launch --num_processes N): each rank takes every N-th batch (BatchLoader), the
LoRA gradients are averaged across ranks before each optimizer step (one all-reduce of a flat buffer;
no DDP wrapper, since the LoRA lives inside the frozen transformer), and only rank 0 writes files.
Gradient accumulation and the LR schedule are counted here, in the saved state, so resuming is exact.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from accelerate.utils import gather_object
import toml
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from library.errors import UserError
from library.eval.models import model_type
from library.eval.sample_scores import make_sample_scorer
from library.objective import objective_of_training
from library.train import checkpoint as C
from library.train import resume_settings as RS
from library.train import timing
from library.train.config import TrainConfig
from library.train.inputs import make_inputs
from library.train.leftovers import clean_output_folder
from library.train.lock import output_lock
from library.train.optim import group_lrs
from library.train.reporting import LossRecord, draw_loss_plot, warn, write_loss_csv
from library.train.samples import write_samples
from library.train.setup import Run, setup
from library.train import step as shared_step
from library.train.validation import validation_loss, wants_validation

log = logging.getLogger(__name__)


@dataclass
class State:
    global_step: int = 0
    micro: int = 0  # micro-batches accumulated since the last optimizer step
    micro_loss: float = 0.0  # the sum of their losses
    record: LossRecord = field(default_factory=LossRecord)
    stop_signal: int = 0  # the signal number that asked us to stop (SIGINT/SIGTERM)
    last_time: float = field(default_factory=time.perf_counter)  # when the previous optimizer step ended
    scorer: Any = None  # library.eval.sample_scores.SampleScorer with --eval_clip_model
    saved: list[str] = field(default_factory=list)  # the LoRA files this run wrote (named when it stops)
    first_step_logged: bool = False


def train(cfg: TrainConfig) -> None:
    # Log lines print above the progress bars (image scan, caching, steps) instead of into them.
    # One run per output folder (a second one is refused); leftovers of killed runs are cleaned first.
    with logging_redirect_tqdm(), ExitStack() as stack:
        def claim_output_folder() -> None:  # after the preflight checks, before anything is written
            if stack.enter_context(output_lock(cfg.save.output_dir)):
                clean_output_folder(cfg.save.output_dir)

        _train(cfg, claim_output_folder)


def _train(cfg: TrainConfig, claim_output_folder: Any = None) -> None:
    if (cfg.sample.eval_clip_model or cfg.sample.eval_reference_dir) and not cfg.sample.sample_prompts:
        raise UserError("--eval_clip_model / --eval_reference_dir score the --sample_prompts images; give "
                        "--sample_prompts (and --sample_every_n_epochs or --sample_every_n_steps)")
    if cfg.sample.eval_clip_model:  # a wrong folder fails now, not after the models are loaded and cached
        model_type(cfg.sample.eval_clip_model, "--eval_clip_model", ("clip",))
    run = setup(cfg, claim_output_folder)
    state = State(scorer=_sample_scorer(run))
    if cfg.save.resume:
        resume(run, state, cfg.save.resume)
    elif cfg.loop.initial_step is not None or cfg.loop.initial_epoch is not None:
        start_at_initial_step(run, state)
    previous = _install_signal_handlers(state)
    acc = run.accelerator
    _init_trackers(run)
    bar = _progress(run, state)
    try:
        if cfg.sample.sample_at_first:
            sample(run, state.global_step, None, state)
        log.info("start training: %d steps, %d epochs, %d steps per epoch", run.total_steps, run.num_epochs,
                 run.steps_per_epoch)
        done = state.global_step >= run.total_steps
        for epoch in range(run.loader.epoch, run.num_epochs):
            if done:  # resumed from the final state: nothing left to train
                break
            for batch in run.loader.iter_epoch(epoch):
                state.micro_loss += forward_backward(run, batch, state)
                state.micro += 1
                if state.micro < cfg.loop.gradient_accumulation_steps:
                    continue
                done = after_optimizer_step(run, state, bar)
                if done:
                    break
            finished = run.loader.epoch > epoch or run.loader.index >= len(run.loader.indices(epoch))
            if finished and state.micro:  # leftover accumulated micro-batches at the epoch end make a step
                done = after_optimizer_step(run, state, bar)
            if finished:
                end_epoch(run, state, epoch)
            if done or state.stop_signal or state.global_step >= run.total_steps:
                break
        finish(run, state)
    finally:
        bar.close()
        acc.end_training()
        _restore_signal_handlers(previous)
    if state.stop_signal:
        sys.exit(128 + state.stop_signal)


def after_optimizer_step(run: Run, state: State, bar: Any) -> bool:
    """Step the optimizer, then log, sample and save as scheduled; True when training must stop."""
    extra = optimizer_step(run)
    loss = _mean_over_ranks(run, state.micro_loss / state.micro)  # the loss of the whole (global) batch
    state.micro, state.micro_loss = 0, 0.0
    state.global_step += 1
    step, cfg = state.global_step, run.cfg
    # Step time: between consecutive optimizer steps (each micro-step waits for its loss, so in steady state
    # this is the device's step time); sampling, validation and saving below are not counted.
    now = time.perf_counter()
    step_time = now - state.last_time
    state.record.add(step, loss, step_time)
    log_step(run, state, loss, step_time, bar, extra)
    if cfg.sample.sample_every_n_steps and not cfg.sample.sample_every_n_epochs \
            and step % cfg.sample.sample_every_n_steps == 0:
        sample(run, step, None, state)
    if run.val_loader is not None and wants_validation(cfg, step, None):
        validate(run, state)
    if cfg.save.save_every_n_steps and step % cfg.save.save_every_n_steps == 0 and step < run.total_steps:
        save(run, state, run.names.step(step), cfg.save.save_state)
        if run.accelerator.is_main_process:
            C.prune_steps(run.names, step, cfg.save.save_last_n_steps, cfg.save.save_last_n_steps_state)
    state.stop_signal = _agree(run, state.stop_signal)
    state.last_time = time.perf_counter()
    return bool(state.stop_signal) or step >= run.total_steps


def forward_backward(run: Run, batch: Any, state: State) -> float:
    inputs = make_inputs(run, batch)
    # A batch comes from one dataset, so its network_multiplier (dataset TOML key) is one number.
    multiplier = float(batch.network_multiplier[0])
    if multiplier != run.network.multiplier:
        run.network.set_multiplier(multiplier)
    obj, cfg = run.cfg.objective, run.cfg

    def check(value: float) -> None:  # every rank stops at the same step
        if _agree(run, int(not math.isfinite(value))):
            stop_non_finite(run, state, value, state.global_step + 1)

    # The shared step (library/train/step.py): tools/bench_train_step.py times exactly this call.
    return shared_step.forward_backward(run.models.transformer, inputs, obj, run.seed, state.global_step,
                                        run.models.guidance_embed, cfg.model.apply_t5_attn_mask,
                                        run.accelerator.autocast, run.accelerator.backward,
                                        cfg.loop.gradient_accumulation_steps, check,
                                        perceptual=run.perceptual)


def optimizer_step(run: Run) -> dict[str, float]:
    """Average the gradients over ranks, clip, step; returns extra values to log (max-norm statistics)."""
    acc = run.accelerator
    params = [p for p in run.network.parameters() if p.requires_grad and p.grad is not None]
    if acc.num_processes > 1 and params:
        # Average LoRA gradients across ranks: one flat all-reduce (the LoRA is tiny next to the model).
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n
    shared_step.apply_update(params, run.optimizer, run.cfg.optimizer.max_grad_norm, acc.clip_grad_norm_)
    if not acc.optimizer_step_was_skipped:
        run.scheduler.step()
    if not run.cfg.network.scale_weight_norms:
        return {}
    # max-norm regularization of each LoRA pair; kohya's log keys
    scaled, mean, largest = run.network.apply_max_norm_regularization(run.cfg.network.scale_weight_norms)
    return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean, "max_norm/max_key_norm": largest}


def log_step(run: Run, state: State, loss: float, step_time: float, bar: Any,
             extra: dict[str, float] | None = None) -> None:
    if not state.first_step_logged:
        state.first_step_logged = True
        if run.accelerator.is_main_process:
            cache = timing.compile_cache_counts() if run.cfg.speed.torch_compile else ""
            log.info("first step: %.1f s (%s)%s", step_time, timing.since_launch(), f"; {cache}" if cache else "")
    lrs = group_lrs(run.optimizer)
    avg = state.record.moving_average()
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{avg:.4f}", lr=f"{lrs[0]:.2e}" if lrs else "-")
    logs = {"loss/current": loss, "loss/average": avg, "time/step_s": step_time}
    for g, lr in zip(run.optimizer.param_groups, lrs):
        logs[f"lr/{g.get('name', 'group')}"] = lr
    logs.update(extra or {})
    run.accelerator.log(logs, step=state.global_step)


def end_epoch(run: Run, state: State, epoch: int) -> None:
    mean = state.record.end_epoch(epoch + 1)
    cfg, acc = run.cfg, run.accelerator
    acc.log({"loss/epoch": mean}, step=state.global_step)
    if acc.is_main_process:
        log.info("epoch %d/%d: mean loss %.5f", epoch + 1, run.num_epochs, mean)
    n = epoch + 1
    if run.val_loader is not None and wants_validation(cfg, None, n):
        validate(run, state)
    if cfg.sample.sample_every_n_epochs and n % cfg.sample.sample_every_n_epochs == 0:
        sample(run, state.global_step, n, state)
    every = run.schedule.save_every_n_epochs  # --save_every_n_epochs or from --save_n_epoch_ratio
    if every and n % every == 0 and n < run.num_epochs and state.global_step < run.total_steps:
        save(run, state, run.names.epoch(n), cfg.save.save_state)
        if acc.is_main_process:
            C.prune_epochs(run.names, n, every, cfg.save.save_last_n_epochs, cfg.save.save_last_n_epochs_state)


def validate(run: Run, state: State) -> None:
    loss = validation_loss(run)
    run.accelerator.log({"loss/validation": loss}, step=state.global_step)
    state.record.add_validation(state.global_step, loss)
    if run.accelerator.is_main_process:
        log.info("step %d: validation loss %.5f", state.global_step, loss)


def sample(run: Run, step: int, epoch: int | None, state: State | None = None) -> None:
    acc = run.accelerator

    def write() -> None:
        run.network.set_multiplier(1.0)  # samples show the LoRA at full strength, whatever the last dataset's
        o = run.cfg.objective
        paths = write_samples(run.prompts, run.models.transformer, run.models.ae, run.out_dir,
                              run.cfg.save.output_name or "sample", step, epoch, run.seed, run.models.guidance_embed,
                              run.models.t5_max_length, run.cfg.model.apply_t5_attn_mask, acc.autocast,
                              objective_of_training(o.flow_from_control, o.control_noise_std, o.flow_reference_tokens))
        log.info("wrote %d sample image(s) under %s", len(paths), run.out_dir / "sample")
        if state is not None and state.scorer is not None and paths:
            scores = state.scorer.score(paths, [e.prompt.prompt for e in run.prompts])
            acc.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
            state.record.add_eval(step, scores)
            log.info("step %d: sample scores %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    if run.prompts:
        on_rank0(run, write)
    acc.wait_for_everyone()


def _sample_scorer(run: Run) -> Any:
    """The CLIP scorer of --eval_clip_model (rank 0 only: it alone writes and scores the samples)."""
    sc = run.cfg.sample
    if not sc.eval_clip_model and not sc.eval_reference_dir or not run.accelerator.is_main_process:
        return None

    return make_sample_scorer(sc.eval_clip_model, sc.eval_reference_dir, sc.eval_class_token_map or (),
                              run.accelerator.device)


def save(run: Run, state: State, lora_path: Any, with_state: bool) -> None:
    """Write the LoRA (and the state beside it) together; rank 0 writes, the other ranks only contribute RNG
    states. Non-finite weights are never written: training stops with the files of this run kept."""
    acc = run.accelerator
    if _agree(run, int(not _weights_finite(run))):
        stop_non_finite(run, state, None, state.global_step)
    rng = gather_object([C.rng_state()]) if with_state and acc.num_processes > 1 else [C.rng_state()]

    def write() -> None:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        md = {**run.metadata, "ss_steps": str(state.global_step), "ss_epoch": str(run.loader.epoch)}
        parts = None
        if with_state:
            train_state = {"global_step": state.global_step, "loader": run.loader.state_dict(),
                           "record": state.record.state_dict(), "total_steps": run.total_steps,
                           "settings": resume_settings(run)}
            parts = C.StateParts(run.network.state_dict(), run.optimizer, run.scheduler, rng, train_state)
        C.save_checkpoint(Path(lora_path), lambda tmp: run.network.save_weights(tmp, run.dtypes.save, md), parts)
        state.saved.append(Path(lora_path).name)
        log.info("saved %s%s", lora_path, f" and {C.Names.state_of(Path(lora_path))}" if with_state else "")

    on_rank0(run, write)
    acc.wait_for_everyone()


def on_rank0(run: Run, write: Callable[[], None]) -> None:
    """Run rank 0's `write` (a save, samples, the loss plot) and tell every rank how it ended, so that a full
    disk or another user error on rank 0 stops all ranks with its one line (exit 2) instead of leaving them
    waiting at the next collective. A bug on rank 0 keeps its traceback there; the others stop with a line."""
    acc = run.accelerator
    if acc.num_processes == 1:
        write()
        return
    outcome: list[str | None] = [None]
    try:
        if acc.is_main_process:
            write()
    except UserError as err:
        outcome[0] = str(err)
        raise
    except OSError as err:  # a path that cannot be written: run_main's one line on rank 0
        outcome[0] = f"{err.filename}: {err.strerror or err}" if err.filename else f"rank 0 stopped: {err!r}"
        raise
    except Exception as err:
        outcome[0] = f"rank 0 stopped with an error while writing its outputs ({type(err).__name__}; its " \
                     "traceback is above)"
        raise
    finally:
        torch.distributed.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None and not acc.is_main_process:
            raise UserError(outcome[0])


def _weights_finite(run: Run) -> bool:
    params = [p.detach() for p in run.network.parameters() if p.requires_grad]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def resume_settings(run: Run) -> dict[str, Any]:
    return RS.settings_of(run.cfg, sum(len(its) for its in run.dataset.items))


def resume(run: Run, state: State, path: str) -> None:
    """Continue from a state: what is kept from it and what the command line sets is in resume_settings.py;
    each difference is a warning naming both values (another optimizer is refused)."""
    loaded = C.load_state(path)
    saved, recorded = loaded.train_state.get("settings"), bool(loaded.train_state.get("settings"))
    if not recorded:  # an older state: its LoRA's metadata and its optimizer tell what they can
        saved, note = RS.reconstruct_settings(path, loaded.train_state)
        if run.accelerator.is_main_process:
            warn(note)
    RS.check_optimizer_matches(saved, run.cfg.optimizer.optimizer_type, path)
    if not recorded:
        RS.check_param_groups(loaded.optimizer.get("param_groups", []), run.optimizer.state_dict()["param_groups"],
                              path)
    try:
        run.network.load_state_dict(loaded.network, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: --resume: the saved LoRA does not match this network ({str(err)[:200]}); "
                        "use the same --network_dim/--network_args as the interrupted run") from None
    try:
        run.optimizer.load_state_dict(loaded.optimizer)
        run.scheduler.load_state_dict(loaded.scheduler)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{path}: --resume: the optimizer/scheduler state does not fit this run ({str(err)[:160]}); "
                        "resume with the settings of the interrupted run") from None
    now = resume_settings(run)
    if run.accelerator.is_main_process:
        for line in RS.compare(saved, now, path):
            log.warning(line)
    run.metadata.update(RS.metadata_overrides(saved, now))
    rank = run.accelerator.process_index
    C.set_rng_state(loaded.rng[rank] if rank < len(loaded.rng) else loaded.rng[0])
    ts = loaded.train_state
    state.global_step = int(ts["global_step"])
    state.record.load_state_dict(ts["record"])
    # rng.pt holds one RNG state per process of the run that wrote it: its number of processes.
    position, note = C.convert_loader_position(ts["loader"], len(loaded.rng), run.accelerator.num_processes)
    if note and run.accelerator.is_main_process:
        warn(note)
    run.loader.load_state_dict(position)
    log.info("resumed from %s at step %d (epoch %d, batch %d); kept from the state: LoRA weights, optimizer and "
             "LR schedule (learning rates included), RNG, data position, loss history; from the command line: "
             "everything else", path, state.global_step, run.loader.epoch, run.loader.index)


def start_at_initial_step(run: Run, state: State) -> None:
    """kohya's --initial_step / --initial_epoch: the step counter starts there (the LR schedule does not,
    as in kohya); batches before it are skipped with --skip_until_initial_step, else the epoch restarts."""
    loop = run.cfg.loop
    step = loop.initial_step if loop.initial_step is not None else (max(1, loop.initial_epoch or 1) - 1) * \
        run.steps_per_epoch
    epoch, within = divmod(step, run.steps_per_epoch)
    index = within * loop.gradient_accumulation_steps if loop.skip_until_initial_step else 0
    state.global_step = step
    run.loader.load_state_dict({"epoch": epoch, "index": index, "seed": run.seed})
    log.info("starting at step %d (epoch %d, batch %d)", step, epoch + 1, index)


def stop_non_finite(run: Run, state: State, loss: float | None, step: int) -> None:
    """Stop at a non-finite loss (before backward) or non-finite LoRA weights (before a save); nothing of
    this step is written. The message names only files this run saved (not older runs' files)."""
    _plot(run, state)
    what = f"the loss is {loss}" if loss is not None else "the LoRA weights became non-finite (nan/inf)"
    raise UserError(
        f"training stopped: {what} at step {step}; nothing was saved after the last good "
        f"step (kept from this run: {', '.join(state.saved) or 'no LoRA yet'}). Try a lower --learning_rate, "
        "--mixed_precision bf16 instead of fp16, or --max_grad_norm 1.0")


def finish(run: Run, state: State) -> None:
    cfg = run.cfg
    if state.record.epoch_open:
        state.record.end_epoch(run.loader.epoch + 1)
    if state.stop_signal:
        name = signal.Signals(state.stop_signal).name
        lora = run.names.step(state.global_step)
        save(run, state, lora, with_state=True)
        if run.accelerator.is_main_process:
            log.warning("%s: saved %s and %s; continue with --resume %s", name, lora, C.Names.state_of(lora),
                        C.Names.state_of(lora))
    else:
        save(run, state, run.names.final(), cfg.save.save_state or cfg.save.save_state_on_train_end)
    _plot(run, state)
    if run.accelerator.is_main_process:
        log.info("%s", timing.summary(state.record.times, run.accelerator.device))


def _plot(run: Run, state: State) -> None:
    """The loss plot (PNG) and the numbers behind it (CSV: step, loss) beside the outputs."""
    def write() -> None:
        stem = run.out_dir / f"{run.cfg.save.output_name or 'last'}_loss"
        path = draw_loss_plot(state.record, stem.with_suffix(".png"))
        write_loss_csv(state.record, stem.with_suffix(".csv"))
        log.info("loss plot: %s", path)

    if state.record.steps:  # the same on every rank (the logged loss is the global batch's)
        on_rank0(run, write)


def _mean_over_ranks(run: Run, value: float) -> float:
    if run.accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=run.accelerator.device)
    return float(run.accelerator.reduce(t, reduction="mean").item())


def _agree(run: Run, flag: int) -> int:
    """The maximum of a per-rank flag over all ranks (so every rank stops at the same step)."""
    if run.accelerator.num_processes == 1:
        return flag
    t = torch.tensor([flag], device=run.accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _install_signal_handlers(state: State) -> dict[int, Any]:
    """SIGINT/SIGTERM finish the current step, then save a state and the LoRA and exit (128 + signal)."""
    def handler(signum: int, frame: Any) -> None:
        if state.stop_signal:  # a second signal: stop now
            raise KeyboardInterrupt
        state.stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a state...", file=sys.stderr)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)


def _init_trackers(run: Run) -> None:
    cfg = run.cfg
    if not run.accelerator.log_with:
        return
    init_kwargs = toml.load(cfg.log.log_tracker_config) if cfg.log.log_tracker_config else {}
    if cfg.log.wandb_run_name:
        init_kwargs.setdefault("wandb", {})["name"] = cfg.log.wandb_run_name
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.effective.items()} \
        if cfg.log.log_config else {}
    run.accelerator.init_trackers(cfg.log.log_tracker_name or "network_train", config=config,
                                  init_kwargs=init_kwargs)


def _progress(run: Run, state: State) -> Any:
    return tqdm(total=run.total_steps, initial=state.global_step, desc="steps", smoothing=0.1,
                disable=not run.accelerator.is_main_process, dynamic_ncols=True)
