"""library/train/samples.py: the file names of sample images."""

from __future__ import annotations

from pathlib import Path

from library.train.samples import sample_path


def test_sample_names() -> None:
    assert sample_path(Path("o"), "lora", 120, None, 3, "A photo, of sks!").name == "lora_000120_03_A_photo_of_sks.png"
    assert sample_path(Path("o"), "lora", 120, 4, 0, "x").name == "lora_e000004_00_x.png"
