"""library/train/checkpoint.py: a data position saved by N processes, resumed by M."""

from __future__ import annotations

from library.train.checkpoint import convert_loader_position


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
