"""flux_enhance_iterate.py (library/differential/iterate.py): rounds, exact/SVD combination, resume, bad commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.differential import iterate as I
from library.differential.cli import split_args
from library.differential.example import write_pairs
from library.errors import UserError
from library.train.cli import parse_args
from networks.lora_formats import read_lora
from test_differential import STEPS, args

ROUND = ("--iterations", "1", "--images_per_prompt", "2", "--pair_width", "32", "--pair_height", "32",
         "--pair_steps", "4", "--fuse_precision", "float")


def iterate(argv: list[str]) -> None:
    from accelerate.state import AcceleratorState, PartialState

    import flux_enhance_iterate

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    assert flux_enhance_iterate.main(argv) == 0


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate")
    toml = write_pairs(root / "d", size=64, names=("chelsea.png", "coffee.png"))
    (root / "prompts.txt").write_text("a photo\n")
    iterate(args(tiny_ckpts, toml, root / "run", *STEPS, *ROUND, "--prompts", str(root / "prompts.txt")))
    # noise is seeded by image path, so the resumed run below must use the same folder: keep this one aside
    (root / "run").rename(root / "a")
    return root, toml, root / "a"


def _equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_rounds_fuse_the_previous_loras_and_combine_exactly(tiny_ckpts, setup):
    root, _, out = setup
    r0, r1 = out / "round_0" / "grade_r0.safetensors", out / "round_1" / "grade_r1.safetensors"
    # round 1's working model is the base with round 0 fused (the user's base untouched)
    model = load_file(str(out / "round_1" / "grade_model_r1.safetensors"))
    base = load_file(str(tiny_ckpts.transformer))
    from networks import lora_keys as K
    for name, w in read_lora(r0).weights.items():
        key = K.split_kohya_name(name)[1] + ".weight"
        assert torch.allclose(model[key], base[key].float() + w.delta(), atol=1e-6), key
    # the pairs: before = round-1 model, after = + round 0's LoRA, same names and captions
    pairs = out / "round_1" / "pairs"
    assert sorted(p.name for p in (pairs / "before").iterdir()) == ["0000.png", "0001.png"]
    assert (pairs / "after" / "0000.txt").read_text().strip() == "a photo"
    # the combination is exactly the sum of the rounds' deltas
    combined, w0, w1 = (read_lora(p).weights for p in (out / "grade.safetensors", r0, r1))
    assert set(combined) == set(w0) | set(w1)
    for n in combined:
        want = (w0[n].delta() if n in w0 else 0) + (w1[n].delta() if n in w1 else 0)
        assert torch.allclose(combined[n].delta(), want, atol=1e-6), n
        assert not torch.allclose(combined[n].delta(), w1[n].delta(), atol=1e-6)  # round 0 is in it
    # SVD combination: the retained energy reported per module is the energy that is retained
    progress = I.IterProgress(root / "svd.json", "x", {})
    I.combine_rounds([r0, r1], I.IterateOptions(combine_rank=2), root / "svd.safetensors", progress)
    energy = json.loads((root / "svd_energy.json").read_text())["energy"]
    svd = read_lora(root / "svd.safetensors").weights
    for n, e in energy.items():
        full = w0[n].delta() + w1[n].delta()
        assert float((svd[n].delta().double() ** 2).sum() / (full.double() ** 2).sum()) == pytest.approx(e, rel=1e-4)
    assert min(energy.values()) < 0.99


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_resume_mid_iteration_gives_the_same_files(tiny_ckpts, setup):
    """Stopped in round 1 (after its fuse and pairs, as its first training starts), then run again."""
    from library.train.trainer import train

    root, toml, a = setup
    b = root / "run"  # the reference run's folder name
    argv = args(tiny_ckpts, toml, b, *STEPS, *ROUND, "--prompts", str(root / "prompts.txt"))

    def stop_in_round_1(cfg):
        if cfg.save.output_name == "grade_r1_stage1":
            raise _Stop
        train(cfg)

    (diff, it), rest, _ = split_args(argv, iterate=True)
    with pytest.raises(_Stop):
        I.run_iterations(parse_args(rest), diff, it, stop_in_round_1)
    done = json.loads((b / "grade_iterate.json").read_text())["done"]
    assert set(done) == {"r0.lora", "r1.model", "r1.pairs"} and not (b / "grade.safetensors").exists()
    model_mtime = (b / "round_1" / "grade_model_r1.safetensors").stat().st_mtime_ns
    iterate(argv)
    assert (b / "round_1" / "grade_model_r1.safetensors").stat().st_mtime_ns == model_mtime  # not fused again
    for rel in ("round_0/grade_r0.safetensors", "round_1/grade_r1.safetensors", "round_1/grade_r1_stage1.safetensors",
                "grade.safetensors"):
        assert _equal(a / rel, b / rel), rel
    for k in range(2):
        assert (a / "round_1" / "pairs" / "after" / f"000{k}.png").read_bytes() == \
            (b / "round_1" / "pairs" / "after" / f"000{k}.png").read_bytes()


def _error(tiny_ckpts, tmp_path: Path, *extra: str) -> str:
    from networks.lora_flux import save_lora
    from tests.interop.helpers import random_lora

    lora = tmp_path / "initial.safetensors"
    if not lora.exists():
        save_lora(random_lora({"lora_unet_double_blocks_0_img_attn_qkv": (768, 256)}), lora, torch.float32, {})
    out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
    (diff, it), rest, _ = split_args(args(tiny_ckpts, tmp_path / "none.toml", out, *STEPS, *ROUND, "--initial_lora",
                                          str(lora), *extra), iterate=True)
    with pytest.raises(UserError) as err:
        I.run_iterations(parse_args(rest), diff, it, lambda cfg: pytest.fail("must not train"))
    return str(err.value).replace(str(out), "OUT")


def test_pair_command_that_fails_or_writes_nothing(tiny_ckpts, tmp_path):
    base = load_file(str(tiny_ckpts.transformer))
    msg = _error(tiny_ckpts, tmp_path, "--pair_command", "echo broken >&2; exit 3")
    assert msg == "--pair_command failed with exit status 3 for OUT/round_1/pairs: broken"
    msg = _error(tiny_ckpts, tmp_path, "--pair_command", "mkdir -p {out}/after")
    assert msg == "OUT/round_1/pairs/before: the pair command wrote no before images (expected " \
                  "OUT/round_1/pairs/before/NAME.png and OUT/round_1/pairs/after/NAME.png)"
    assert "--prompts" in _error(tiny_ckpts, tmp_path)  # built-in generation without a prompt file
    assert "placeholder" in _error(tiny_ckpts, tmp_path, "--pair_command", "make {nope}")
    assert _equal_sd(base, load_file(str(tiny_ckpts.transformer)))  # the user's base was only read


def _equal_sd(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
