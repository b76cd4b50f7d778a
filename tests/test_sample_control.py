"""Sample images with reference images during training: --ci / control_image in prompt files, and the first
training pairs of a control/degradation dataset when no prompts are given (control | output | target)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.train.prompts import load_prompts
from tests.test_inference import BAR, psnr
from train_helpers import base_args, data, train_in_process  # noqa: F401 (data: a fixture)


def test_prompt_files_take_a_control_image(tmp_path) -> None:
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "refs" / "old.png")
    txt = tmp_path / "p.txt"
    txt.write_text("restore --ci refs/old.png --w 64 --h 64\nno reference\n")  # relative to the prompt file
    a, b = load_prompts(txt)
    assert Path(a.control_image) == tmp_path / "refs" / "old.png" and b.control_image is None
    (tmp_path / "p.toml").write_text(f'[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "x"\n'
                                     f'control_image = "{tmp_path / "refs" / "old.png"}"\n')
    assert load_prompts(tmp_path / "p.toml")[0].control_image == str(tmp_path / "refs" / "old.png")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "x", "control_image": "refs/old.png"}]))
    assert Path(load_prompts(tmp_path / "p.json")[0].control_image) == tmp_path / "refs" / "old.png"
    txt.write_text("restore --ci refs/missing.png\n")
    with pytest.raises(UserError, match="p.txt:1: control image refs/missing.png not found"):
        load_prompts(txt)


@pytest.mark.slow
def test_training_pairs_are_sampled_side_by_side(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    """No --sample_prompts, a degradation dataset: the first 2 pairs are sampled. At step 0 (zero-init LoRA) the
    middle panel is the base model's Kontext edit of the pair's control, as inference makes it; a --ci prompt
    file gives control | output."""
    from library.data.dataset import build_datasets
    from library.data.config import dataset_flags, load_dataset_config
    from library.flux.loading import load_autoencoder, load_transformer
    from library.flux.text_encoders import FluxTextEncoders
    from library.sampling import generate_image, read_png_settings

    toml = tmp_path / "restore.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\n'
                    f'image_dir = "{data / "dog"}"\nclass_tokens = "restore this photo"\n'
                    '[datasets.subsets.degradation]\nops = ["downsample", "noise"]\n'
                    'downsample = [2, 4]\nnoise_sigma = [0.02, 0.05]\nvariants = 2\n')
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "1", "--sample_at_first")
    argv[argv.index("--dataset_config") + 1] = str(toml)
    train_in_process(argv)
    files = sorted((out / "sample").glob("*.png"))
    assert len(files) == 2
    sheet = Image.open(files[0]).convert("RGB")
    assert sheet.size == (3 * 32, 32)
    meta = read_png_settings(files[0])
    assert (meta["control_image"], meta["objective"], meta["step"]) == ("training pair", "noise", 0)

    dataset, _ = build_datasets(load_dataset_config(str(toml), dataset_flags({})), 3, progress=False)
    it = dataset.items[0][0]
    target, control = dataset.pair(it)
    panels = [sheet.crop((i * 32, 0, (i + 1) * 32, 32)) for i in range(3)]
    assert np.array_equal(np.asarray(panels[0]), control) and np.array_equal(np.asarray(panels[2]), target)
    tr = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
    ae = load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32)
    te = FluxTextEncoders.load(tiny_ckpts.clip_l, tiny_ckpts.t5xxl, "cpu", torch.float32)
    ref = generate_image(tr, ae, te, meta["prompt"], 32, 32, meta["steps"], meta["guidance"], meta["seed"],
                         t5_max_length=16, control=Image.fromarray(control), progress=False)
    assert psnr(panels[1], ref) >= BAR
    plain = generate_image(tr, ae, te, meta["prompt"], 32, 32, meta["steps"], meta["guidance"], meta["seed"],
                           t5_max_length=16, progress=False)
    assert psnr(panels[1], plain) < psnr(panels[1], ref) - 10  # the reference reached the sample

    prompts = tmp_path / "prompts.txt"
    Image.fromarray(control).save(tmp_path / "ctl.png")
    prompts.write_text("restore this photo --ci ctl.png --w 80 --h 64 --s 2 --d 1\n")
    out2 = tmp_path / "out2"
    argv = base_args(tiny_ckpts, data, out2, "--max_train_steps", "1", "--sample_at_first", "--sample_prompts",
                     str(prompts))
    argv[argv.index("--dataset_config") + 1] = str(toml)
    train_in_process(argv)
    (f,) = (out2 / "sample").glob("*.png")
    assert Image.open(f).size == (2 * 80, 64) and read_png_settings(f)["control_image"] == "ctl.png"
