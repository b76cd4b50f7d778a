"""Trainer pieces without a model: sample prompts, checkpoint names and pruning, the loss plot, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.train.checkpoint import Names, prune_epochs, prune_steps
from library.train.cli import parse_args
from library.train.config import build_config
from library.train.reporting import LossRecord, draw_loss_plot, write_loss_csv
from library.train.precision import resolve_dtypes
from library.train.prompts import load_prompts, parse_line
from library.train.samples import sample_path
from library.train.step import draw_noise_and_sigmas, sample_keys


def test_prompt_line_syntax() -> None:
    got = parse_line("a cat, sitting --W 768 --h 512 --d 42 --s 30 --g 2.5 --l 4 --n blurry, dark", "f")
    assert got == {"prompt": "a cat, sitting", "width": "768", "height": "512", "seed": "42", "sample_steps": "30",
                   "guidance_scale": "2.5", "scale": "4", "negative_prompt": "blurry, dark"}
    with pytest.raises(UserError, match="unknown option --x"):
        parse_line("a --x 1", "f")


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\na dog --w 100 --h 70 --d 3\nsecond --s 5000\n")
    a, b = load_prompts(txt)
    assert (a.prompt, a.width, a.height, a.seed, a.sample_steps) == ("a dog", 96, 64, 3, 20)
    assert b.sample_steps == 1000 and b.index == 1 and b.seed is None
    tml = tmp_path / "p.toml"
    tml.write_text('[prompt]\nwidth = 256\nsample_steps = 4\n[[prompt.subset]]\nprompt = "x"\n'
                   '[[prompt.subset]]\nprompt = "y"\nwidth = 512\n')
    assert [(p.prompt, p.width, p.sample_steps) for p in load_prompts(tml)] == [("x", 256, 4), ("y", 512, 4)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["plain", {"prompt": "obj", "seed": 7, "guidance_scale": 1.0}]))
    got = load_prompts(js)
    assert got[0].prompt == "plain" and got[1].seed == 7 and got[1].guidance_scale == 1.0
    js.write_text('{"prompt": 1}')
    with pytest.raises(UserError, match="JSON list"):
        load_prompts(js)


def test_sample_names() -> None:
    assert sample_path(Path("o"), "lora", 120, None, 3, "A photo, of sks!").name == "lora_000120_03_A_photo_of_sks.png"
    assert sample_path(Path("o"), "lora", 120, 4, 0, "x").name == "lora_e000004_00_x.png"


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


def test_precision_dtypes() -> None:
    def dt(*argv: str):
        return resolve_dtypes(build_config(parse_args(list(argv))).precision)

    assert dt().compute == torch.float32 and dt().network == torch.float32 and dt().save == torch.float32
    bf = dt("--mixed_precision", "bf16", "--full_bf16", "--save_precision", "fp16", "--fp8_base")
    assert (bf.compute, bf.network, bf.save, bf.fp8_base) == (torch.bfloat16, torch.bfloat16, torch.float16, True)
    assert dt("--mixed_precision", "fp16").text == torch.float32  # T5 overflows in fp16


def test_noise_depends_on_the_sample_not_on_the_batch() -> None:
    obj = build_config(parse_args(["--timestep_sampling", "sigmoid"])).objective
    lat = torch.zeros(3, 16, 4, 4)
    keys = sample_keys(["a.png", "b.png", "a.png"])
    assert keys == ("a.png#0", "b.png#0", "a.png#1")
    n, n_in, s = draw_noise_and_sigmas(obj, lat, keys, seed=1, step=7)
    n2, _, s2 = draw_noise_and_sigmas(obj, lat[1:2], keys[1:2], seed=1, step=7)
    assert torch.equal(n[1:2], n2) and torch.equal(s[1:2], s2)
    assert not torch.equal(n[0], n[2]) and torch.equal(n, n_in)  # no input perturbation without ip_noise_gamma
    n3, _, _ = draw_noise_and_sigmas(obj, lat, keys, seed=1, step=8)
    assert not torch.equal(n, n3)


def test_step_loss_masks_prior_weights_and_prediction_spaces(tiny_ckpts) -> None:
    from contextlib import nullcontext

    from library.flux.loading import load_transformer
    from library.train.step import StepInputs, flow_matching_loss

    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    p = model.params
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 16, 4, 4, generator=g)
    t5, pooled = torch.randn(2, 8, p.context_in_dim, generator=g), torch.randn(2, p.vec_in_dim, generator=g)

    def loss(*argv: str, idx=(0, 1), weights=(1.0, 1.0), mask=None) -> float:
        obj = build_config(parse_args(list(argv))).objective
        i = list(idx)
        x = StepInputs(lat[i], t5[i], pooled[i], torch.ones(len(i), 8), torch.tensor(weights), mask,
                       tuple(("a#0", "b#0")[k] for k in i))
        with torch.no_grad():
            return float(flow_matching_loss(model, x, obj, 1, 5, True, False, nullcontext))

    raw = ("--model_prediction_type", "raw")
    both = loss(*raw)
    assert loss(*raw, mask=torch.zeros(2, 1, 4, 4)) == 0.0
    assert loss(*raw, mask=torch.ones(2, 1, 4, 4)) == pytest.approx(both, rel=1e-6)
    only_a = loss(*raw, idx=(0,), weights=(1.0,))
    assert 2 * loss(*raw, weights=(1.0, 0.0)) == pytest.approx(only_a, rel=1e-5)  # prior weight 0 drops b
    # sigma_scaled with sigma_sqrt weighting is the velocity loss again: the spaces match in the trainer too
    scaled = loss("--model_prediction_type", "sigma_scaled", "--weighting_scheme", "sigma_sqrt")
    raw_same_sigma = loss(*raw, "--weighting_scheme", "sigma_sqrt")
    assert scaled == pytest.approx(raw_same_sigma, rel=1e-4)


def test_xformers_flag_reaches_the_model(tiny_ckpts) -> None:
    from library.flux.loading import load_transformer
    from library.train.models import apply_memory_and_speed

    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    cfg = build_config(parse_args(["--xformers", "--gradient_checkpointing"]))
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers"):
            apply_memory_and_speed(cfg, model, torch.device("cpu"))
    else:
        apply_memory_and_speed(cfg, model, torch.device("cpu"))
        assert model.gradient_checkpointing


def test_kontext_reference_tokens_reach_the_model(tiny_ckpts) -> None:
    """Control-subset batches: the clean reference latents go in as extra tokens with first id axis 1."""
    from contextlib import nullcontext

    from library.flux.loading import load_transformer
    from library.train.step import StepInputs, flow_matching_loss

    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    p = model.params
    g = torch.Generator().manual_seed(0)
    lat, ref = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 6, 4, generator=g)
    t5, pooled = torch.randn(1, 8, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    seen = {}
    forward = model.forward

    def spy(**kw):
        seen.update(cond=kw["cond"], cond_ids=kw["cond_ids"])
        return forward(**kw)

    model.forward = spy
    obj = build_config(parse_args(["--model_prediction_type", "raw"])).objective

    def loss(cond):
        x = StepInputs(lat, t5, pooled, torch.ones(1, 8), torch.ones(1), None, ("a#0",), cond_latents=cond)
        with torch.no_grad():
            return float(flow_matching_loss(model, x, obj, 1, 5, True, False, nullcontext))

    plain = loss(None)
    assert seen["cond"] is None
    with_ref = loss(ref)
    assert seen["cond"].shape == (1, 6, 64)  # (6/2)*(4/2) tokens of 16*2*2 channels
    assert seen["cond_ids"][0, :, 0].eq(1).all() and seen["cond_ids"][0, -1, 1:].tolist() == [2.0, 1.0]
    assert abs(with_ref - plain) > 1e-4 * plain  # the reference changes the prediction
    assert loss(ref * 0.5) != pytest.approx(with_ref, rel=1e-6)
