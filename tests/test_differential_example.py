"""The colour-grade example of docs/differential.md: the differential LoRA learns the grade, not the photos."""

from __future__ import annotations

import pytest

from library.differential.example import grade_effect, train_grade_loras

MARGIN = 0.15  # grade units, 1.0 = the plain -> graded distance of the photos' mean latents, for the mean over
# TRAIN_SEEDS (seen: +0.38 to +0.75 graded, -0.42 to -0.61 swapped). Each training seed must have the sign only:
# the noise is keyed by the image paths, which lie under pytest's tmp_path and so change from run to run, and
# single seeds were seen as low as +0.147 (a clean-clone CI run on 2026-12-07 failed a per-seed 0.15 margin).
TRAIN_SEEDS = (0, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("swap", [False, True])
def test_differential_lora_moves_samples_along_the_grade_and_swapped_the_other_way(tiny_ckpts, tmp_path, swap):
    """Pairs: chelsea.png and coffee.png (64 px, trained at 32 px); after = the warm grade of
    library/differential/example.colour_grade (R x1.3 + 50, B x0.5), before = the plain photo (swap: reversed).
    Training (each of TRAIN_SEEDS): stage 1 8 steps, rank 16, lr 1e-2; stage 2 12 steps, rank 4, lr 2e-3; and
    the null twin: stage 2 again on identical pairs (after := before), same stage-1 file, same noise draws.
    Measure (example.grade_effect): the one-step sample's mean latent on the grade axis (plain photos 0, graded
    1), with the LoRA minus with its null twin, both at strength 1 on the PLAIN base; prompt "a photo",
    sampling seeds 0-7, 32x32, guidance 3.5. Pass: for EVERY training seed the mean over the 8 sampling seeds
    points towards the grade (swapped: away from it), and the mean over the training seeds is > MARGIN that way.
    Why the twin: without it (the LoRA against the plain base alone, this test before) the sign depended on
    the noise draw: +0.03 graded / +0.24 swapped in the shipped example, and in a sweep seed 3 gave -1.1
    graded while seed 2 gave +0.54 swapped, because the unfitted part of stage 1 moves both LoRAs alike.
    Negative control: the twin itself is the identical-pairs LoRA; swapped pairs must flip the sign."""
    sign = -1.0 if swap else 1.0
    means = {}
    for seed in TRAIN_SEEDS:
        lora, null = train_grade_loras(tiny_ckpts, tmp_path / str(seed), swap=swap, seed=seed)
        effect = grade_effect(tiny_ckpts, tmp_path / str(seed), lora, null)
        means[seed] = sum(effect) / len(effect)
    print("mean grade effect per training seed:", {k: round(v, 3) for k, v in means.items()})
    assert all(sign * m > 0 for m in means.values()), means
    assert sign * sum(means.values()) / len(means) > MARGIN, means
