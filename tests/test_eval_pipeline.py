"""flux_eval_lora.py render -> score -> report on the tiny checkpoints: names, parity with
flux_minimal_inference.py, resume without redoing, the CSV's rows and columns, plots and the HTML page."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_eval_lora
import flux_minimal_inference
from library.errors import UserError
from eval_helpers import PHOTOS, photo, tiny_clip, tiny_dino  # noqa: F401 (fixtures)
from library.eval.table import read_rows
from library.flux.loading import load_transformer
from library.sampling import read_png_settings
from networks.lora_flux import create_network
from tests.interop.helpers import randomize_network

SIZE = ["--width", "32", "--height", "32", "--steps", "2", "--t5xxl_max_token_length", "16", "--device", "cpu",
        "--dtype", "float32"]
PROMPTS = {"00": "a photo of sks dog", "01": "a red car"}


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    """Two checkpoints of one run (rank 4, steps 10 and 20) and one of another (rank 8), random ups."""
    root = tmp_path_factory.mktemp("eval_pipeline")
    transformer = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    for name, rank, step, seed in (("dog-step00000010", 4, 10, 1), ("dog", 4, 20, 2), ("dog_r8", 8, 20, 3)):
        net = create_network(1.0, rank, rank, transformer, None, None)
        randomize_network(net, seed=seed, std=0.2)
        net.save_weights(root / "loras" / f"{name}.safetensors", torch.float32,
                         {"ss_steps": str(step), "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    refs = root / "refs"
    refs.mkdir()
    for p in PHOTOS[:2]:
        photo(p, 48).save(refs / f"{p.stem}.png")
    return root


def _models(ck) -> list[str]:
    return ["--ckpt_path", str(ck.transformer), "--clip_l", str(ck.clip_l), "--t5xxl", str(ck.t5xxl), "--ae", str(ck.ae)]


def render(ck, root: Path, out: Path) -> None:
    argv = ["render", *_models(ck), "--loras", str(root / "loras"), "--strengths", "0,0.5,1",
            "--prompts", str(root / "prompts.json"), "--seeds", "1", "--out_dir", str(out), *SIZE]
    assert flux_eval_lora.main(argv) == 0


def test_render_score_report(tiny_ckpts, setup, tiny_clip, tiny_dino, tmp_path):
    images = tmp_path / "images"
    render(tiny_ckpts, setup, images)
    names = sorted(p.name for p in images.glob("*.png"))
    # base once per prompt x seed; each of 3 LoRAs at 0.5 and 1 per prompt x seed
    assert len(names) == 2 + 3 * 2 * 2
    assert "base_0_00_1_0.png" in names and "dog_10_01_1_0.5.png" in names and "dog_r8_20_00_1_1.png" in names
    md = read_png_settings(images / "dog_20_00_1_1.png")
    assert (md["lora"], md["step"], md["strength"], md["prompt_id"], md["network_dim"]) == ("dog", 20, 1.0, "00", "4")

    # the same image as flux_minimal_inference.py with --lora_weights (the same sampler, LoRA on the fly)
    argv = [*_models(tiny_ckpts), "--prompt", PROMPTS["00"], "--seed", "1", "--lora_weights",
            str(setup / "loras" / "dog.safetensors;1.0"), "--output_dir", str(tmp_path), "--output_name", "ref", *SIZE]
    assert flux_minimal_inference.main(argv) == 0
    ours, ref = (np.asarray(Image.open(p)) for p in (images / "dog_20_00_1_1.png", tmp_path / "ref.png"))
    np.testing.assert_array_equal(ours, ref)
    base = np.asarray(Image.open(images / "base_0_00_1_0.png"))
    assert np.abs(base.astype(int) - ours).max() > 0  # the LoRA changes the image (negative control)

    # resume: a half-done render redoes only the missing images
    before = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    for n in ("dog_10_01_1_0.5.png", "base_0_01_1_0.png"):
        (images / n).unlink()
    (images / ".dog_r8_20_00_1_1.png.tmp123").write_bytes(b"partial")  # a killed write leaves only a temp file
    render(tiny_ckpts, setup, images)
    after = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    assert sorted(after) == sorted(before)
    assert sorted(n for n in after if after[n] != before[n]) == ["base_0_01_1_0.png", "dog_10_01_1_0.5.png"]

    # an image of the same name but other settings is not silently reused
    (setup / "other.json").write_text(json.dumps({**PROMPTS, "00": "a photo of sks cat"}))
    argv = ["render", *_models(tiny_ckpts), "--loras", str(setup / "loras"), "--strengths", "0,0.5,1",
            "--prompts", str(setup / "other.json"), "--seeds", "1", "--out_dir", str(images), *SIZE]
    with pytest.raises(UserError, match="base_0_00_1_0.png: exists but was rendered with other settings .prompt"):
        flux_eval_lora.main(argv)

    csv = tmp_path / "scores" / "scores.csv"
    argv = ["score", "--images", str(images), "--prompts", str(setup / "prompts.json"), "--clip_model", str(tiny_clip),
            "--dino_model", str(tiny_dino), "--reference_dir", str(setup / "refs"), "--class_token_map",
            "sks dog=a dog", "--out", str(csv), "--device", "cpu", "--batch_size", "5"]
    assert flux_eval_lora.main(argv) == 0
    columns, rows = read_rows(csv)
    assert columns == ["file", "lora", "step", "prompt_id", "seed", "strength", "clip_score", "clip_i", "dino",
                       "hf_energy", "hf_ratio", "grid16"]
    assert sorted(r["file"] for r in rows) == names
    for r in rows:
        assert all(r[c] is not None for c in columns[6:]), r
        if r["lora"] == "base":
            assert r["hf_ratio"] == pytest.approx(1.0)
    spectra = np.load(csv.with_name("scores_spectra.npz"))
    assert spectra["spectra"].shape[0] == len(rows) and np.isfinite(spectra["spectra"][:, 1:]).any()

    report = tmp_path / "report"
    assert flux_eval_lora.main(["report", "--scores", str(csv), "--images", str(images), "--out_dir", str(report)]) == 0
    check_html(report / "index.html", min_images=8)


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def check_html(page: Path, min_images: int) -> None:
    parser = _Imgs()
    parser.feed(page.read_text(encoding="utf-8"))
    assert len(parser.srcs) >= min_images
    for src in parser.srcs:
        assert not src.startswith(("http:", "https:", "/")), src  # self-contained: relative files only
        target = (page.parent / src).resolve()
        assert target.is_file(), src
        with Image.open(target) as im:
            im.load()  # decodes
