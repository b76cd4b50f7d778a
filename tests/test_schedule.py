"""library/schedule.py: one step/epoch schedule for the trainer, --dry_run, the TE cache and the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from library.schedule import DEFAULT_MAX_TRAIN_STEPS, batches_per_rank, epochs_from, make_schedule
from library.train.flags import FLAG_BY_NAME_DEFAULTS
from train_helpers import base_args, data, train_in_process  # noqa: F401 (data: a fixture)


def _loop(batches: int, accum: int, total: int | None, epochs: int | None) -> tuple[int, int]:
    """(epochs entered, optimizer steps) of the trainer's loop shape: a step every `accum` micro-batches,
    leftovers make a step at the epoch end, stop at `total` steps or after `epochs` epochs."""
    steps = entered = 0
    while (total is None or steps < total) and (epochs is None or entered < epochs):
        entered += 1
        micro = 0
        for _ in range(batches):
            micro += 1
            if micro == accum:
                steps, micro = steps + 1, 0
                if total is not None and steps >= total:
                    break
        if micro and (total is None or steps < total):
            steps += 1
    return entered, steps


@pytest.mark.parametrize("batches", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("accum", [1, 2, 3, 4])
def test_schedule_is_what_the_loop_runs(batches: int, accum: int) -> None:
    for total in (1, 2, 4, 9, 13):
        s = make_schedule(batches, accum, max_train_steps=total)
        assert (s.epochs, s.total_steps) == _loop(batches, accum, total, None), (batches, accum, total)
    for epochs in (1, 3):
        s = make_schedule(batches, accum, max_train_epochs=epochs)
        assert (s.epochs, s.total_steps) == _loop(batches, accum, None, epochs)
        assert s.steps_per_epoch == _loop(batches, accum, None, 1)[1]


def test_issue_example_three_batches_accumulation_two() -> None:
    # The defect: 3 batches per epoch, accumulation 2, 4 steps -> the loop runs 2 epochs (the trainer said 3).
    s = make_schedule(3, 2, max_train_steps=4)
    assert (s.total_steps, s.epochs, s.steps_per_epoch) == (4, 2, 2)
    assert batches_per_rank(7, 2) == 4 and batches_per_rank(8, 2) == 4


def test_default_steps_are_the_flags() -> None:
    assert FLAG_BY_NAME_DEFAULTS["max_train_steps"] == DEFAULT_MAX_TRAIN_STEPS == 1600
    assert make_schedule(10).total_steps == FLAG_BY_NAME_DEFAULTS["max_train_steps"]


def test_save_n_epoch_ratio_is_kohyas() -> None:
    # kohya: save_every_n_epochs = floor(num_epochs / ratio) or 1, replacing --save_every_n_epochs
    assert make_schedule(4, max_train_epochs=10, save_n_epoch_ratio=3).save_every_n_epochs == 3
    assert make_schedule(4, max_train_epochs=2, save_n_epoch_ratio=5).save_every_n_epochs == 1
    assert make_schedule(4, max_train_epochs=10, save_every_n_epochs=4, save_n_epoch_ratio=2).save_every_n_epochs == 5
    assert make_schedule(4, max_train_epochs=10, save_every_n_epochs=4).save_every_n_epochs == 4


def test_trainer_dry_run_and_metadata_agree_under_accumulation(tiny_ckpts, data: Path, tmp_path: Path,
                                                               capsys) -> None:
    # 4 images at batch 1 = 4 batches per epoch; accumulation 3 -> 2 steps per epoch; 4 steps -> 2 epochs
    # (the old trainer formula said ceil(4 * 3 / 4) = 3). --save_n_epoch_ratio 2 -> a save after epoch 1.
    toml = tmp_path / "b1.toml"
    toml.write_text((data / "data.toml").read_text().replace("batch_size = 2", "batch_size = 1"))
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "4", "--gradient_accumulation_steps", "3",
                     "--save_n_epoch_ratio", "2", "--save_state")
    argv[argv.index("--dataset_config") + 1] = str(toml)
    import flux_train_network

    assert flux_train_network.main([*argv, "--dry_run"]) == 0
    plan = capsys.readouterr().out
    assert "epochs: 2; total optimizer steps: 4" in plan and "steps per epoch: 2" in plan
    train_in_process(argv)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_epochs"] == "2"
    record = json.loads((out / "lora-state" / "train_state.json").read_text())["record"]
    assert [e[0] for e in record["epoch_means"]] == [1, 2]  # the loop ran the 2 epochs it announced
    assert (out / "lora-000001.safetensors").exists()  # --save_n_epoch_ratio 2 over 2 epochs: every epoch


def test_epochs_from_a_resumed_position() -> None:
    s = make_schedule(4, 2, max_train_steps=4)  # 2 steps per epoch, 2 epochs
    assert epochs_from(s, 4, 2, epoch=1, index=0, global_step=2) == 2  # the same run: unchanged
    # a state of 2 processes (1 step per epoch) after 2 steps sits at epoch 2: 2 more steps = 1 more epoch
    assert epochs_from(s, 4, 2, epoch=2, index=0, global_step=2) == 3
    assert epochs_from(s, 4, 2, epoch=2, index=2, global_step=3) == 3  # 1 step left, within epoch 2
    assert epochs_from(s, 4, 2, epoch=5, index=0, global_step=4) == 5  # nothing left to train
