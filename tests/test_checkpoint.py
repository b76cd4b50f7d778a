"""library/train/checkpoint.py: kohya save names and pruning; a data position saved by N processes, resumed by M."""

from __future__ import annotations

from pathlib import Path

from library.train.checkpoint import Names, convert_loader_position, prune_epochs, prune_steps


def _taken(index: int, world: int, n: int) -> set[int]:
    """The epoch's batches the ranks took after `index` batches each (rank r takes r, r + world, ...)."""
    return {b for r in range(world) for b in range(r, n, world)[:index]}


def test_same_world_size_is_unchanged() -> None:
    pos = {"epoch": 2, "index": 3, "seed": 1}
    assert convert_loader_position(pos, 2, 2) == (pos, None)


def test_position_covers_what_was_done_and_skips_nothing() -> None:
    n = 24
    for saved in (1, 2, 3, 4):
        for world in (1, 2, 3, 4):
            for index in range(0, n // saved):
                new, note = convert_loader_position({"epoch": 0, "index": index, "seed": 0}, saved, world)
                done, resumed = _taken(index, saved, n), _taken(new["index"], world, n)
                assert resumed <= done  # nothing done is skipped ...
                assert len(done) - len(resumed) < world  # ... and fewer than `world` batches are seen again
                assert (note is None) == (saved == world)


def test_note_says_what_changed() -> None:
    _, note = convert_loader_position({"epoch": 0, "index": 3, "seed": 0}, 2, 4)
    assert "written by 2 processes and this run has 4" in note and "continues at batch 4 (2 seen again)" in note
    assert "ranks 2..3 start from rank 0's RNG state" in note and "not bit for bit" in note


def test_checkpoint_names_and_pruning(tmp_path: Path) -> None:
    names = Names(tmp_path, "lora", ".safetensors")
    assert names.epoch(3).name == "lora-000003.safetensors" and names.final().name == "lora.safetensors"
    assert Names.state_of(names.step(40)).name == "lora-step00000040-state"
    assert Names(tmp_path, None, ".pt").step(5).name == "at-step00000005.pt"
    for step in (10, 20, 30, 40):
        names.step(step).write_text("x")
        Names.state_of(names.step(step)).mkdir()
    prune_steps(names, 40, keep_steps=25, state_keep_steps=15)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["lora-step00000020.safetensors", "lora-step00000030-state", "lora-step00000030.safetensors",
                    "lora-step00000040-state", "lora-step00000040.safetensors"]
    for e in (2, 4, 6):
        names.epoch(e).write_text("x")
    prune_epochs(names, 6, every=2, keep=2, state_keep=None)
    assert not names.epoch(2).exists() and names.epoch(4).exists() and names.epoch(6).exists()
