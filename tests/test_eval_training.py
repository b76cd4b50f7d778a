"""--eval_clip_model / --eval_reference_dir: the --sample_prompts images are scored as they are made; the
means go to the loss CSV (eval_* columns) and the trackers (eval/* scalars) and equal scoring the same
sample files afterwards with library/eval/clip.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from eval_helpers import tiny_clip  # noqa: F401 (fixture)
from library.errors import UserError
from library.eval.clip import ClipScorer, clip_scores, mean_reference_similarity
from train_helpers import base_args, data, train_in_process  # noqa: F401 (data: a fixture)


def test_sample_images_are_scored_while_training(tiny_ckpts, data: Path, tiny_clip, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "4", "--sample_every_n_steps", "2",
                               "--sample_prompts", str(data / "prompts.txt"), "--eval_clip_model", str(tiny_clip),
                               "--eval_reference_dir", str(data / "dog"), "--eval_class_token_map", "sks dog=a dog",
                               "--logging_dir", str(tmp_path / "logs"), "--log_with", "tensorboard"))
    lines = (out / "lora_loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,validation_loss,step_time_s,eval_clip_i,eval_clip_score"
    rows = {int(r.split(",")[0]): r.split(",") for r in lines[1:]}
    assert [s for s, r in rows.items() if r[4]] == [2, 4] and not rows[1][5]
    # the same numbers from the sample files, scored afterwards
    scorer = ClipScorer(tiny_clip, torch.device("cpu"))
    prompts = ["a photo of a dog", "a cat"]  # prompts.txt with the class token replaced
    refs = scorer.image_embeds([Image.open(p).convert("RGB") for p in sorted((data / "dog").iterdir())])
    for step in (2, 4):
        files = sorted((out / "sample").glob(f"lora_{step:06d}_*.png"))
        emb = scorer.image_embeds([Image.open(f).convert("RGB") for f in files])
        assert float(rows[step][5]) == pytest.approx(float(clip_scores(emb, scorer.text_embeds(prompts)).mean()), abs=1e-4)
        assert float(rows[step][4]) == pytest.approx(float(mean_reference_similarity(emb, refs).mean()), abs=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert {"eval/clip_score", "eval/clip_i"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/clip_score")] == [2, 4]


def test_eval_flags_are_checked_before_loading(tiny_ckpts, data: Path, tiny_clip, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--sample_prompts"):
        train_in_process(base_args(tiny_ckpts, data, tmp_path / "o", "--max_train_steps", "1",
                                   "--eval_clip_model", str(tiny_clip)))
    with pytest.raises(UserError, match="--eval_clip_model: no config.json"):
        train_in_process(base_args(tiny_ckpts, data, tmp_path / "o", "--max_train_steps", "1", "--sample_prompts",
                                   str(data / "prompts.txt"), "--eval_clip_model", str(data)))
    assert not (tmp_path / "o").exists()
