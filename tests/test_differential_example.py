"""The colour-grade example of docs/differential.md: the differential LoRA learns the grade, not the photos."""

from __future__ import annotations

import pytest

from library.differential.example import grade_shift, train_grade_lora

MARGIN = 0.1  # on the grade axis, 1.0 = the whole before -> after distance of the training pairs' mean latents


@pytest.mark.slow
@pytest.mark.parametrize("swap", [False, True])
def test_differential_lora_moves_samples_along_the_grade_and_swapped_the_other_way(tiny_ckpts, tmp_path, swap,
                                                                                    monkeypatch):
    """Pairs: chelsea.png and coffee.png (64 px, trained at 32 px); after = the warm grade of
    library/differential/example.colour_grade (R x1.3 + 50, B x0.5), before = the plain photo (swap: reversed).
    Training: seed 3, AdamW; stage 1 40 steps, rank 16, alpha 16, lr 1e-2; stage 2 12 steps, rank 4, alpha 4,
    lr 2e-3.
    Measure: the mean sampled latent's coordinate on the grade axis (origin = mean latent of the plain photos,
    unit = mean latent of the graded ones minus it; the tiny AE's random decoder does not keep colour, so the
    grade is read in the latents the AE gives graded and plain photos). Samples: prompt "a photo", seeds 0-7,
    32x32, 1 sampling step (see example.grade_shift), guidance 3.5, with the LoRA at strength 1 on the PLAIN base
    vs the plain base alone.
    Pass: the mean over the 8 seeds moves the expected way (towards the grade; swapped: away) by > MARGIN.
    The effect is weak on the tiny random model: single seeds do move the other way (5 of 8 seeds moved away
    from the grade in one swapped run), so only the mean is asserted.
    The training noise is seeded by image path; the keys are taken relative to tmp_path so that the run is the
    same wherever pytest puts it. This pins one noise draw: with other draws (other folders) the sign of the
    shift was seen to flip on the tiny random model (docs/differential.md), so this is a regression check of
    one configuration, not a proof that the tiny example always learns the grade."""
    import library.train.trainer as trainer
    from library.train.step import sample_keys

    monkeypatch.setattr(trainer, "sample_keys", lambda paths: sample_keys(
        [str(p).replace(str(tmp_path), "") for p in paths]))
    lora = train_grade_lora(tiny_ckpts, tmp_path, swap=swap, seed=3)
    shifts = [with_lora - base for base, with_lora in grade_shift(tiny_ckpts, tmp_path / "pairs", lora,
                                                                  seeds=tuple(range(8)),
                                                                  axis_sign=-1.0 if swap else 1.0)]
    sign = -1.0 if swap else 1.0
    print("grade shifts per seed:", [round(x, 3) for x in shifts])
    assert sign * sum(shifts) / len(shifts) > MARGIN, shifts
