"""Training lowers the loss and writes the LoRA, samples (equal to inference), plot and config;
validation loss and --sample_at_first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from train_helpers import REPO, data, base_args, train_in_process, losses  # noqa: F401 (data: a fixture)


def test_thirty_steps_lower_the_loss_and_write_everything(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "30", "--learning_rate", "5e-3",
                               "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "20",
                               "--save_every_n_steps", "20"))
    got = losses(out)
    assert len(got) == 30
    first, last = sum(got[:3]) / 3, sum(got[-5:]) / 5
    assert last < 0.6 * first, (first, last, got)
    sd = load_file(str(out / "lora.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd and all(
        v.dtype == torch.float32 for v in sd.values())
    assert sorted(p.name for p in (out / "sample").iterdir()) == [
        "lora_000020_00_a_photo_of_sks_dog.png", "lora_000020_01_a_cat.png"]
    with Image.open(out / "sample" / "lora_000020_01_a_cat.png") as im:
        assert im.size == (80, 64) and "CFG scale: 2" in im.text["parameters"]
    # a preview is what the inference script gives for the same seed with that step's LoRA
    proc = subprocess.run([sys.executable, str(REPO / "flux_minimal_inference.py"), "--ckpt_path",
                           str(tiny_ckpts.transformer), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl",
                           str(tiny_ckpts.t5xxl), "--ae", str(tiny_ckpts.ae), "--prompt", "a photo of sks dog",
                           "--width", "64", "--height", "64", "--seed", "5", "--steps", "3", "--guidance", "3.5",
                           "--t5xxl_max_token_length", "16", "--dtype", "fp32", "--device", "cpu",
                           "--lora_weights", str(out / "lora-step00000020.safetensors"),
                           "--output_dir", str(tmp_path / "inf"),
                           "--output_name", "inf"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import numpy as np

    with Image.open(out / "sample" / "lora_000020_00_a_photo_of_sks_dog.png") as a, \
            Image.open(next((tmp_path / "inf").glob("inf*.png"))) as b:
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1, diff.max()
    with Image.open(out / "lora_loss.png") as im:
        assert im.size == (800, 450)
    assert (out / "lora_config.json").is_file() and "network_dim = 4" in (out / "lora_args.toml").read_text()


def test_validation_loss_on_held_out_images_and_sample_at_first(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "4", "--validation_split", "0.5",
                               "--validate_every_n_steps", "2", "--validate_every_n_epochs", "100",
                               "--sample_prompts", str(data / "prompts.txt"), "--sample_at_first"))
    assert sorted(p.name[:14] for p in (out / "sample").iterdir()) == ["lora_000000_00", "lora_000000_01"]
    rows = [line.split(",") for line in (out / "lora_loss.csv").read_text().splitlines()[1:]]
    val = {int(r[0]): float(r[2]) for r in rows if r[2]}
    assert sorted(val) == [2, 4]
    assert val[2] != val[4] and all(0 < v < 10 for v in val.values())


def test_control_pairs_and_dataset_network_multiplier(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    """A Kontext edit-pair subset trains end to end; a dataset with network_multiplier = 0 trains nothing
    (the LoRA contributes nothing there, so its up weights stay at their zero init)."""
    from safetensors.torch import load_file

    src, tgt = tmp_path / "source", tmp_path / "target"
    src.mkdir()
    tgt.mkdir()
    for p in (data / "dog").glob("*.jpg"):  # the "before" image of each pair: same name, other content
        Image.open(p).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(src / p.name)
        (tgt / p.name).write_bytes(p.read_bytes())
        (tgt / p.name).with_suffix(".txt").write_text("turn the dog upright")

    def run(name: str, multiplier: float) -> dict:
        toml = tmp_path / f"{name}.toml"
        toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 2\nnetwork_multiplier = {multiplier}\n'
                        f'[[datasets.subsets]]\nimage_dir = "{tgt}"\nconditioning_data_dir = "{src}"\n'
                        'caption_extension = ".txt"\n')
        out = tmp_path / name
        argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "3")
        argv[argv.index("--dataset_config") + 1] = str(toml)
        train_in_process(argv)
        return load_file(str(out / "lora.safetensors"))

    trained = run("pairs", 1.0)
    assert any(v.abs().max() > 0 for k, v in trained.items() if k.endswith("lora_up.weight"))
    frozen = run("pairs_off", 0.0)
    assert all(v.abs().max() == 0 for k, v in frozen.items() if k.endswith("lora_up.weight"))
