"""Console logging, warnings, the step/epoch loss record and the loss plot (a PNG drawn with Pillow).

Trackers (TensorBoard, wandb) go through accelerate's `log`; this module only keeps what we print and
plot ourselves. Nothing here runs at import time; the entry point calls `setup_console_logging`.
"""

from __future__ import annotations

import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from library.atomic import write_bytes_atomic, write_text_atomic
from library.train.config import LogConfig

log = logging.getLogger("flux_train")


def setup_console_logging(cfg: LogConfig) -> None:
    level = getattr(logging, (cfg.console_log_level or "INFO").upper())
    fmt = "%(message)s" if cfg.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler: logging.Handler = (
        logging.FileHandler(cfg.console_log_file, encoding="utf-8") if cfg.console_log_file
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def warn(message: str) -> None:
    """A one-line user warning on stderr (also visible when logging is redirected to a file); through
    tqdm.write, so a warning during training prints above the progress bar instead of into it."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
    sys.stderr.flush()


@dataclass
class LossRecord:
    """Per-step losses and per-epoch means; the data behind the progress bar and the plot."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    epoch_means: list[tuple[int, float, int]] = field(default_factory=list)  # (epoch, mean, its last step)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, sample-image scores)
    times: list[float] = field(default_factory=list)  # seconds each optimizer step took (nan: not timed)
    _epoch_sum: float = 0.0
    _epoch_n: int = 0

    def add(self, step: int, loss: float, seconds: float = math.nan) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.times.append(seconds)
        self._epoch_sum += loss
        self._epoch_n += 1

    def end_epoch(self, epoch: int) -> float:
        mean = self._epoch_sum / max(1, self._epoch_n)
        self.epoch_means.append((epoch, mean, self.steps[-1] if self.steps else 0))
        self._epoch_sum, self._epoch_n = 0.0, 0
        return mean

    def add_validation(self, step: int, loss: float) -> None:
        self.validation.append((step, loss))

    def add_eval(self, step: int, scores: dict[str, float]) -> None:
        self.evals.append((step, dict(scores)))

    @property
    def epoch_open(self) -> bool:
        """Steps were recorded since the last `end_epoch` (training stopped inside an epoch)."""
        return self._epoch_n > 0

    def moving_average(self, window: int = 20) -> float:
        tail = self.losses[-window:]
        return sum(tail) / max(1, len(tail))

    def state_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses, "epoch_means": self.epoch_means,
                "validation": self.validation, "epoch_sum": self._epoch_sum, "epoch_n": self._epoch_n,
                "evals": self.evals, "times": self.times}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])
        self.epoch_means = [tuple(x) for x in state["epoch_means"]]  # type: ignore[misc]
        self.validation = [tuple(x) for x in state.get("validation", [])]  # type: ignore[misc]
        self.evals = [(int(s), dict(d)) for s, d in state.get("evals", [])]
        self.times = list(state.get("times", [math.nan] * len(self.steps)))
        self._epoch_sum, self._epoch_n = state["epoch_sum"], state["epoch_n"]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw_loss_plot(record: LossRecord, path: Path, title: str = "training loss",
                   size: tuple[int, int] = (800, 450)) -> Path:
    """Step loss (light), its moving average (dark) and epoch means (dots), on linear axes; atomic write."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    draw.text((w - 430, 8), "step loss", fill=(120, 150, 220))
    draw.text((w - 360, 8), "moving average", fill=(20, 60, 160))
    draw.text((w - 260, 8), "epoch mean (dots)", fill=(200, 60, 20))
    if record.validation:
        draw.text((w - 130, 8), "validation (squares)", fill=(20, 140, 60))
    finite = [(s, v) for s, v in zip(record.steps, record.losses) if math.isfinite(v)]
    if finite:
        xs, ys = [s for s, _ in finite], [v for _, v in finite]
        every_y = ys + [v for _, v in record.validation if math.isfinite(v)]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(every_y), max(every_y)
        y0, y1 = (y0 - 1e-3, y1 + 1e-3) if y1 - y0 < 1e-6 else (y0, y1)

        def px(s: float, v: float) -> tuple[float, float]:
            return (left + (s - x0) / (x1 - x0) * (w - left - right),
                    top + (1 - (v - y0) / (y1 - y0)) * (h - top - bottom))

        draw.rectangle([left, top, w - right, h - bottom], outline="black")
        for i in range(5):  # y ticks
            v = y0 + (y1 - y0) * i / 4
            _, yy = px(x0, v)
            draw.line([left - 4, yy, left, yy], fill="black")
            draw.text((4, yy - 6), f"{v:.4g}", fill="black")
        for i in range(5):  # x ticks
            s = x0 + (x1 - x0) * i / 4
            xx, _ = px(s, y0)
            draw.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
            draw.text((xx - 10, h - bottom + 8), f"{int(round(s))}", fill="black")
        draw.text((w // 2 - 15, h - 16), "step", fill="black")
        if len(finite) > 1:
            draw.line([px(s, v) for s, v in finite], fill=(170, 190, 230), width=1)
            smooth = _smooth(ys, max(1, len(ys) // 20))
            draw.line([px(s, v) for s, v in zip(xs, smooth)], fill=(20, 60, 160), width=2)
        for vstep, vloss in record.validation:
            cx, cy = px(vstep, min(max(vloss, y0), y1))
            draw.rectangle([cx - 3, cy - 3, cx + 3, cy + 3], outline=(20, 140, 60), width=2)
        for _, mean, epoch_end_step in record.epoch_means:
            cx, cy = px(epoch_end_step, min(max(mean, y0), y1))
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(200, 60, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())  # through the one write seam (disk full: one line)
    return path



def write_loss_csv(record: LossRecord, path: Path) -> Path:
    """step, loss, validation loss (empty when none), the step's wall time in seconds (empty when untimed)."""
    validation = dict(record.validation)  # step -> the last validation loss measured at that step
    times = record.times if len(record.times) == len(record.steps) else [math.nan] * len(record.steps)
    rows = ["step,loss,validation_loss,step_time_s"]
    for s, v, t in zip(record.steps, record.losses, times):
        val = repr(validation[s]) if s in validation else ""
        rows.append(f"{s},{v!r},{val},{'' if math.isnan(t) else f'{t:.6f}'}")
    if record.evals:  # sample-image scores (--eval_clip_model): one more column each, filled at sampled steps
        evals = dict(record.evals)
        names = sorted({k for _, d in record.evals for k in d})
        rows[0] += "".join(f",eval_{k}" for k in names)
        for i, s in enumerate(record.steps, start=1):
            rows[i] += "".join(f",{evals[s][k]!r}" if s in evals and k in evals[s] else "," for k in names)
    return write_text_atomic(path, "\n".join(rows) + "\n")
