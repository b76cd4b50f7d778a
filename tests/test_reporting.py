"""library/train/reporting.py: the loss record, its plot and CSV."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from library.train.reporting import LossRecord, draw_loss_plot, write_loss_csv


def test_loss_plot_and_csv(tmp_path: Path) -> None:
    rec = LossRecord()
    for s in range(1, 41):
        rec.add(s, 2.0 / s + (0.1 if s % 3 else 0.0))
        if s % 10 == 0:
            rec.end_epoch(s // 10)
    rec.add(41, float("nan"))  # a non-finite value must not break the plot
    rec.add_validation(20, 0.5)
    path = draw_loss_plot(rec, tmp_path / "loss.png")
    with Image.open(path) as im:
        px = im.convert("RGB")
        assert im.size == (800, 450)
        colours = {px.getpixel((x, y)) for x in range(70, 780, 3) for y in range(30, 410, 3)}
    assert {(20, 60, 160), (200, 60, 20), (20, 140, 60)} <= colours  # average line, epoch dots, validation
    assert [m for _, m, _ in rec.epoch_means][0] == pytest.approx(sum(rec.losses[:10]) / 10)
    csv = write_loss_csv(rec, tmp_path / "loss.csv").read_text().splitlines()
    assert csv[20] == "20,0.2,0.5,"  # untimed steps leave the time empty
    assert csv[0] == "step,loss,validation_loss,step_time_s" and csv[1].startswith("1,") and len(csv) == 42
    rec.add(41, 0.3, 0.25)
    assert write_loss_csv(rec, tmp_path / "loss.csv").read_text().splitlines()[-1] == "41,0.3,,0.250000"
