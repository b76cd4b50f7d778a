"""flux_eval_lora.py study: STUDY.toml parsing and checks, per-variant dataset TOMLs, skip / resume / train
decisions, and (slow) a reduced study end to end that a rerun does not redo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import toml
from PIL import Image

from eval_helpers import tiny_clip  # noqa: F401 (fixture)
from library.errors import UserError
from library.eval.render import caption_extensions
from library.eval.report import differing_keys, lora_meta
from library.sampling import sample_settings, save_png
from library.study import latest_state, load_study, variant_command, variant_dataset
from train_helpers import REPO, data  # noqa: F401 (data: a fixture)


def _study(tmp: Path, body: str) -> Path:
    (tmp / "p.json").write_text('{"00": "a photo of sks dog"}')
    path = tmp / "study.toml"
    path.write_text('[study]\noutput_dir = "out"\nargs = ["--network_dim", "8"]\n[eval]\nprompts = "p.json"\n' + body)
    return path


def test_study_toml_is_checked(tmp_path):
    with pytest.raises(UserError, match=r"no \[\[variant\]\] tables"):
        load_study(_study(tmp_path, ""))
    with pytest.raises(UserError, match="unknown training flag or key 'network_dimm' .did you mean --network_dim"):
        load_study(_study(tmp_path, '[[variant]]\nname = "a"\nnetwork_dimm = 4\n'))
    with pytest.raises(UserError, match="dataset_config is needed"):
        load_study(_study(tmp_path, '[[variant]]\nname = "a"\ndataset = { caption_extension = ".x" }\n'))
    with pytest.raises(UserError, match="name"):
        load_study(_study(tmp_path, '[[variant]]\nname = "a_b"\n'))
    path = _study(tmp_path, "")
    path.write_text(path.read_text().replace("[eval]", "[eval]\nstrenghts = [1.0]"))
    with pytest.raises(UserError, match="'strenghts' .did you mean 'strengths'"):
        load_study(path)


def test_variant_commands_skip_resume_train(tmp_path):
    study = load_study(_study(tmp_path, '[[variant]]\nname = "a"\nnetwork_dim = 4\ngradient_checkpointing = true\n'
                                        '[[variant]]\nname = "b"\n[[variant]]\nname = "c"\n'))
    a, b, c = study.variants
    action, argv = variant_command(study, a)
    assert action == "train"
    assert argv[:2] == ["--network_dim", "8"] and argv[2:5] == ["--network_dim", "4", "--gradient_checkpointing"]
    assert argv[-5:] == ["--output_dir", str(tmp_path / "out" / "train" / "a"), "--output_name", "a", "--save_state"]
    done = tmp_path / "out" / "train" / "b"
    done.mkdir(parents=True)
    (done / "b.safetensors").write_bytes(b"x")
    assert variant_command(study, b) == ("skip", [])
    killed = tmp_path / "out" / "train" / "c"
    for name, step in (("c-000002-state", 4), ("c-000004-state", 8), ("c-000006-state", None)):
        (killed / name).mkdir(parents=True)
        if step is not None:  # the newest one was being written when the run died: no train_state.json
            (killed / name / "train_state.json").write_text(json.dumps({"global_step": step}))
    assert latest_state(killed) == killed / "c-000004-state"
    action, argv = variant_command(study, c)
    assert action == "resume" and argv[-2:] == ["--resume", str(killed / "c-000004-state")]


def test_variant_dataset_overrides_where_set(tmp_path):
    (tmp_path / "imgs").mkdir()
    base = tmp_path / "data.toml"
    base.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                    '[[datasets.subsets]]\nimage_dir = "imgs"\ncaption_extension = ".caption"\n'
                    '[[datasets.subsets]]\nimage_dir = "imgs"\n')
    out = variant_dataset(base, {"caption_extension": ".florence", "resolution": 128}, tmp_path / "v" / "d.toml")
    doc = toml.load(out)
    assert doc["general"]["caption_extension"] == ".florence" and doc["datasets"][0]["resolution"] == 128
    subs = doc["datasets"][0]["subsets"]
    assert subs[0]["caption_extension"] == ".florence" and "caption_extension" not in subs[1]
    assert subs[0]["image_dir"] == str((tmp_path / "imgs").resolve())  # still found from the new folder
    assert toml.load(base)["datasets"][0]["subsets"][0]["caption_extension"] == ".caption"  # base untouched


@pytest.mark.slow
def test_reduced_study_end_to_end_and_rerun_redoes_nothing(tiny_ckpts, data: Path, tiny_clip, tmp_path):
    ck = tiny_ckpts
    (tmp_path / "p.json").write_text('{"00": "a photo of sks dog", "01": "a cat"}')
    study = tmp_path / "study.toml"
    args = ["--pretrained_model_name_or_path", str(ck.transformer), "--clip_l", str(ck.clip_l), "--t5xxl",
            str(ck.t5xxl), "--ae", str(ck.ae), "--network_module", "networks.lora_flux", "--network_train_unet_only",
            "--optimizer_type", "AdamW", "--learning_rate", "2e-3", "--max_train_steps", "4",
            "--save_every_n_steps", "2", "--seed", "3", "--model_prediction_type", "raw", "--cache_latents",
            "--cache_text_encoder_outputs", "--t5xxl_max_token_length", "16", "--max_data_loader_n_workers", "0"]
    study.write_text(
        f'[study]\noutput_dir = "out"\ndataset_config = "{data / "data.toml"}"\nargs = {json.dumps(args)}\n'
        '[eval]\nprompts = "p.json"\nstrengths = [0.0, 1.0]\nseeds = [1]\nwidth = 32\nheight = 32\nsteps = 2\n'
        f't5xxl_max_token_length = 16\ndtype = "float32"\ndevice = "cpu"\nclip_model = "{tiny_clip}"\n'
        'class_token_map = ["sks dog=a dog"]\n'
        '[[variant]]\nname = "r2"\nnetwork_dim = 2\nnetwork_alpha = 2\n'
        '[[variant]]\nname = "r4-nocap"\nnetwork_dim = 4\nnetwork_alpha = 4\ndataset = { caption_extension = ".none" }\n')
    cmd = [sys.executable, str(REPO / "flux_eval_lora.py"), "study", str(study)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    loras = sorted(p.relative_to(out).as_posix() for p in out.glob("train/*/*.safetensors"))
    assert loras == ["train/r2/r2-step00000002.safetensors", "train/r2/r2.safetensors",
                     "train/r4-nocap/r4-nocap-step00000002.safetensors", "train/r4-nocap/r4-nocap.safetensors"]
    images = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(images) == 2 + 2 * 2 * 2 and "r4-nocap_4_01_1_1.png" in images
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header.startswith("file,lora,step,prompt_id,seed,strength,clip_score")
    page = (out / "report" / "index.html").read_text()
    assert "comparison.png" in page  # the variants differ in rank and variant name
    mtimes = {p: p.stat().st_mtime_ns for p in [*out.glob("train/*/*.safetensors"), *(out / "images").glob("*.png")]}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[r2] skip" in r.stdout and "[r4-nocap] skip" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a variant killed after its step-2 save: it resumes from that state instead of starting over
    train = out / "train" / "r2"
    for p in (train / "r2.safetensors", train / "r2-state"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[r2] resume" in r.stdout and f"--resume {train / 'r2-step00000002-state'}" in r.stdout
    assert "[r4-nocap] skip" in r.stdout and (train / "r2.safetensors").is_file()
    assert "resumed from" in r.stderr


def test_report_compares_caption_strategies_by_the_lora_metadata_else_the_variant(tmp_path):
    """The comparison's `captions` key is the caption_extension the LoRA's ss_datasets records (render copies it
    into the PNG), and the variant name only when the metadata has none. Before this change the key did not
    exist: two variants trained on the same captions still differed only by name, and the label said nothing."""
    def md(*exts: str) -> dict:
        return {"ss_datasets": json.dumps([{"subsets": [{"caption_extension": e} for e in exts]}])}

    assert caption_extensions(md(".txt", ".florence", ".txt")) == ".florence,.txt"
    assert caption_extensions({}) == "" and caption_extensions({"ss_datasets": "not json"}) == ""
    s = sample_settings(True, "a photo", 16, 16, 1, 3.5, 1)
    rows = []
    for lora, variant, ext in (("a", "a", ".txt"), ("b", "b", ".txt"), ("c", "c", ".florence"), ("d", "d", "")):
        save_png(Image.new("RGB", (16, 16)), tmp_path / f"{lora}.png", s,
                 {"lora": lora, "variant": variant, "caption_extension": ext, "network_dim": "4"})
        rows.append({"lora": lora, "file": f"{lora}.png"})
    meta = lora_meta(tmp_path, rows)
    assert {k: m["captions"] for k, m in meta.items()} == {"a": ".txt", "b": ".txt", "c": ".florence", "d": "d"}
    assert differing_keys({k: meta[k] for k in "ab"}) == ["variant"]  # same captions: only the names differ
    assert differing_keys({k: meta[k] for k in "ac"}) == ["captions", "variant"]
