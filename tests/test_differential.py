"""Differential LoRAs (flux_train_differential.py, library/differential/): the two stages, resume, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_train_differential
from cli_helpers import run_in_process
from library.differential import run as R
from library.differential.cli import split_args
from library.differential.example import write_pairs
from library.differential.stages import plan_stage2
from library.errors import UserError
from library.train.checkpoint import file_sha256
from library.train.cli import parse_args
from train_helpers import REPO, train_in_process

STEPS = ("--max_train_steps", "4", "--stage1_max_train_steps", "4", "--stage1_network_dim", "8")


def args(ckpts, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpts.transformer), "--clip_l", str(ckpts.clip_l),
            "--t5xxl", str(ckpts.t5xxl), "--ae", str(ckpts.ae), "--dataset_config", str(toml),
            "--output_dir", str(out), "--output_name", "grade", "--network_dim", "4", "--network_alpha", "4",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "2e-3", "--seed", "3",
            "--model_prediction_type", "raw", "--cache_latents", "--cache_text_encoder_outputs",
            "--t5xxl_max_token_length", "16", "--max_data_loader_n_workers", "0", *extra]


def differential(argv: list[str]) -> None:
    from accelerate.state import AcceleratorState, PartialState

    import flux_train_differential

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    assert flux_train_differential.main(argv) == 0


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"), size=64, names=("chelsea.png", "coffee.png"))


@pytest.fixture(scope="module")
def finished(tiny_ckpts, pairs, tmp_path_factory) -> Path:
    """One uninterrupted run with states saved every 2 steps (stage 2 resumes from one of them below)."""
    out = tmp_path_factory.mktemp("diff") / "out"
    differential(args(tiny_ckpts, pairs, out, *STEPS, "--save_every_n_steps", "2", "--save_state"))
    return out


def test_stage2_trains_on_base_plus_stage1_and_keeps_only_stage2(tiny_ckpts, pairs, finished, tmp_path):
    from library.train import models as M
    from library.train.precision import resolve_dtypes
    from networks.flux_merge_lora import merge_into_file
    from networks import lora_keys as K
    from networks.lora_formats import read_lora

    stage1, result = finished / "grade_stage1.safetensors", finished / "grade.safetensors"
    md = json.loads((finished / "grade_differential.json").read_text())
    assert set(md["stages"]) == {"1", "2"}
    # the result names stage 1 and its hash
    from library.flux.safetensors_io import read_metadata
    meta = read_metadata(result)
    assert meta["modelspec.differential_stage1"] == "grade_stage1.safetensors"
    assert meta["modelspec.differential_stage1_sha256"] == file_sha256(stage1)
    # stage 2's base (through the trainer's --base_weights path) equals base + stage 1 merged by flux_merge_lora
    opts, rest, _ = split_args(args(tiny_ckpts, pairs, finished, *STEPS))
    cfg2 = plan_stage2(parse_args(rest), stage1, None).train
    assert cfg2.network.base_weights == (str(stage1),) and cfg2.data.pair_side == "after"
    models = M.load_models(cfg2, resolve_dtypes(cfg2.precision), torch.device("cpu"), need_text=False, need_ae=False)
    M.merge_base_weights(cfg2, models)
    deltas = {K.split_kohya_name(n)[1]: w.delta() for n, w in read_lora(stage1).weights.items()}
    merge_into_file(tiny_ckpts.transformer, tmp_path / "merged.safetensors", deltas, torch.float32, "transformer")
    merged, base = load_file(str(tmp_path / "merged.safetensors")), load_file(str(tiny_ckpts.transformer))
    got = models.transformer.state_dict()
    changed = 0
    for k, v in merged.items():
        assert got[k].dtype == torch.float32 and torch.allclose(got[k], v, atol=1e-6), k
        changed += not torch.equal(v.to(base[k].dtype), base[k])
    assert changed >= len(deltas) // 2  # negative control: stage 1 really changed the base
    # the result is stage 2 alone: the same file as flux_train_network --base_weights stage1 (bit for bit)
    ref = tmp_path / "ref"
    train_in_process([a if a != "grade" else "ref" for a in args(tiny_ckpts, pairs, ref, "--max_train_steps", "4")]
                     + ["--base_weights", str(stage1)])
    want, have = load_file(str(ref / "ref.safetensors")), load_file(str(result))
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert {w.rank for w in read_lora(result).weights.values()} == {4}  # stage 1 is rank 8
    s1 = read_lora(stage1).weights
    assert not any(torch.allclose(w.delta(), s1[n].delta(), atol=1e-6) for n, w in read_lora(result).weights.items())


def test_resume_in_stage2_gives_the_same_files(tiny_ckpts, pairs, finished, tmp_path):
    """What a run killed after stage-2 step 2 leaves behind: stage 1 done, stage 2's step-2 state."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for p in ("grade.safetensors", "grade-state"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    rec = json.loads((out / "grade_differential.json").read_text())
    del rec["stages"]["2"]
    (out / "grade_differential.json").write_text(json.dumps(rec))
    assert (out / "grade-step00000002-state").is_dir()
    stage1_mtime = (out / "grade_stage1.safetensors").stat().st_mtime_ns
    differential(args(tiny_ckpts, pairs, out, *STEPS, "--save_every_n_steps", "2", "--save_state"))
    assert (out / "grade_stage1.safetensors").stat().st_mtime_ns == stage1_mtime  # stage 1 not retrained
    for name in ("grade.safetensors", "grade_stage1.safetensors"):
        a, b = load_file(str(finished / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = [ln.split(",")[1] for ln in (finished / "grade_loss.csv").read_text().splitlines()[1:]]
    b = [ln.split(",")[1] for ln in (out / "grade_loss.csv").read_text().splitlines()[1:]]
    assert a == b and len(a) == 4
    # a finished run run again does nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    differential(args(tiny_ckpts, pairs, out, *STEPS, "--save_every_n_steps", "2", "--save_state"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def _run_error(argv: list[str]) -> str:
    opts, rest, _ = split_args(argv)
    with pytest.raises(UserError) as err:
        if "--dry_run" in rest:
            R.dry_run(parse_args(rest), opts)
        else:
            R.run_differential(parse_args(rest), opts, lambda cfg: pytest.fail("must not train"))
    return str(err.value)


def test_bad_pairs_name_the_file(tiny_ckpts, tmp_path):
    toml = write_pairs(tmp_path / "d", size=64, names=("chelsea.png", "coffee.png"))
    base = args(tiny_ckpts, toml, tmp_path / "out", *STEPS)
    (tmp_path / "d" / "before" / "coffee.png").rename(tmp_path / "x.png")
    assert f"{tmp_path / 'd' / 'after' / 'coffee.png'}: datasets[0].subsets[0].before_dir: no before image" \
        in _run_error(base + ["--dry_run"])
    Image.new("RGB", (64, 48)).save(tmp_path / "d" / "before" / "coffee.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "before" / "extra.png")
    msg = _run_error(base + ["--dry_run"])
    assert f"{tmp_path / 'd' / 'before' / 'extra.png'}: datasets[0].subsets[0].before_dir: no after image" in msg
    assert f"{tmp_path / 'd' / 'before' / 'coffee.png'}: before image is 64x48 but its after image" in msg
    assert not (tmp_path / "out").exists()
    # a plain subset (no before_dir) is not a pair subset
    (tmp_path / "plain.toml").write_text(f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n'
                                         f'image_dir = "{tmp_path / "d" / "after"}"\n')
    assert "no before_dir" in _run_error(args(tiny_ckpts, tmp_path / "plain.toml", tmp_path / "out", *STEPS))


def test_stage1_file_must_be_a_flux_lora_and_user_files_are_never_overwritten(tiny_ckpts, pairs, tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.weight": torch.zeros(2, 2)}, str(tmp_path / "sd.safetensors"))
    base = args(tiny_ckpts, pairs, tmp_path / "out", *STEPS)
    assert str(tmp_path / "sd.safetensors") in _run_error(base + ["--stage1_weights", str(tmp_path / "sd.safetensors")])
    assert "no such file" in _run_error(base + ["--stage1_weights", str(tmp_path / "missing.safetensors")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "grade.safetensors").write_bytes(b"mine")
    assert f"{out / 'grade.safetensors'}: already exists and is not from this run" in _run_error(base)
    assert (out / "grade.safetensors").read_bytes() == b"mine" and sorted(p.name for p in out.iterdir()) == \
        ["grade.safetensors"]
    assert "--resume" in _run_error(base + ["--resume", str(out)])


def test_cli_errors_exit_2_in_one_line(tiny_ckpts, pairs, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "flux_train_differential.py"),
                          *args(tiny_ckpts, pairs, tmp_path / "out", "--stage1_weights",
                                str(tmp_path / "no.safetensors"))],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: "), res.stderr
    assert "no.safetensors" in res.stderr
    res = run_in_process(flux_train_differential.main, ["--help"])  # tests/cli_helpers.py
    assert res.returncode == 0 and "--stage1_max_train_steps" in res.stdout and "--max_train_steps" in res.stdout


def test_disk_caches_serve_both_stages(tiny_ckpts, tmp_path):
    """Stage 2 finds every text entry stage 1 wrote; the after latents are new entries beside the befores'."""
    from library.train.trainer import train

    toml = write_pairs(tmp_path / "d", size=64, names=("chelsea.png", "coffee.png"))
    cache = tmp_path / "d" / "after" / ".flux_cache"
    counts = []

    def counting(cfg):
        train(cfg)
        counts.append({kind: len(list((cache / kind).rglob("*.safetensors"))) for kind in ("text", "latents")})

    argv = args(tiny_ckpts, toml, tmp_path / "out", "--max_train_steps", "2", "--stage1_max_train_steps", "2",
                "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
    opts, rest, _ = split_args(argv)
    R.run_differential(parse_args(rest), opts, counting)
    assert counts == [{"text": 1, "latents": 2}, {"text": 1, "latents": 4}]


def test_pair_mode_average_is_the_mean_of_the_group_loras(tiny_ckpts, tmp_path):
    from networks.lora_formats import read_lora

    for name in ("chelsea", "coffee"):
        write_pairs(tmp_path / name, size=64, names=(f"{name}.png",))
    toml = tmp_path / "groups.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 32\n' + "".join(
        f'[[datasets.subsets]]\nimage_dir = "{tmp_path / n / "after"}"\nbefore_dir = "{tmp_path / n / "before"}"\n'
        for n in ("chelsea", "coffee")))
    out = tmp_path / "out"
    differential(args(tiny_ckpts, toml, out, "--max_train_steps", "2", "--stage1_max_train_steps", "2",
                      "--pair_mode", "average"))
    g0, g1, avg = (read_lora(out / f"{n}.safetensors").weights for n in ("grade_g0", "grade_g1", "grade"))
    for n in avg:
        assert torch.allclose(avg[n].delta(), 0.5 * (g0[n].delta() + g1[n].delta()), atol=1e-6), n
    assert any(not torch.allclose(g0[n].delta(), g1[n].delta(), atol=1e-5) for n in avg)  # the groups differ
    assert "chelsea" in (out / "grade_g0_data.toml").read_text() and "coffee" not in \
        (out / "grade_g0_data.toml").read_text()


def test_before_dir_key_is_checked_like_conditioning_data_dir(tmp_path):
    from library.data.config import format_resolved, load_dataset_config

    toml = write_pairs(tmp_path / "d", size=64, names=("chelsea.png",))
    assert "before_dir = " in format_resolved(load_dataset_config(toml))
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text().replace(str(tmp_path / "d" / "before"), str(tmp_path / "missing")))
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]\.before_dir: .*missing: no such directory"):
        load_dataset_config(bad)
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    bad.write_text(f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nmetadata_file = "{meta}"\n'
                   f'before_dir = "{tmp_path / "d" / "before"}"\n')
    with pytest.raises(UserError, match=r"before_dir: not allowed in a finetune subset"):
        load_dataset_config(bad)
    bad.write_text(toml.read_text() + "before_dirr = 1\n")
    with pytest.raises(UserError, match="did you mean before_dir"):
        load_dataset_config(bad)
