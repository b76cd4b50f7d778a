"""Shared pieces of the end-to-end training tests: 32 px copies of real images, in-process runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset_configs" / "data"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Small copies (64 px) of 2 dog photos (class tokens) and 2 captioned images, with data TOMLs."""
    root = tmp_path_factory.mktemp("train_data")
    for sub, names in (("dog", ["00.jpg", "01.jpg"]), ("captioned", ["chelsea.png", "coffee.png"])):
        (root / sub).mkdir()
        src = DATA / ("dreambooth_dog" if sub == "dog" else "clip_skimage_captioned")
        for name in names:
            with Image.open(src / name) as im:
                im.convert("RGB").resize((64, 64 * im.height // im.width)).save(root / sub / name)
            caption = (src / name).with_suffix(".txt")
            if caption.exists():
                (root / sub / caption.name).write_text(caption.read_text())
    (root / "data.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 32\nbatch_size = 2\n'
        f'[[datasets.subsets]]\nimage_dir = "{root / "dog"}"\nclass_tokens = "sks dog"\n'
        f'[[datasets.subsets]]\nimage_dir = "{root / "captioned"}"\n')
    (root / "pair").mkdir()  # 2 images, one bucket, a cache of their own: for the data-parallel comparison
    for p in (root / "dog").glob("*.jpg"):
        (root / "pair" / p.name).write_bytes(p.read_bytes())
    (root / "dog.toml").write_text(
        f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{root / "pair"}"\n'
        'class_tokens = "sks dog"\n')
    (root / "prompts.txt").write_text("a photo of sks dog --w 64 --h 64 --d 5 --s 3 --g 3.5\n"
                                      "a cat --w 80 --h 64 --s 3 --l 2.0 --n blurry\n")
    return root


def base_args(ckpts, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ckpts.transformer), "--clip_l", str(ckpts.clip_l),
        "--t5xxl", str(ckpts.t5xxl), "--ae", str(ckpts.ae), "--dataset_config", str(data / "data.toml"),
        "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora_flux",
        "--network_dim", "4", "--network_alpha", "4", "--network_train_unet_only", "--optimizer_type", "AdamW",
        "--learning_rate", "2e-3", "--seed", "3", "--model_prediction_type", "raw", "--cache_latents",
        "--cache_text_encoder_outputs", "--t5xxl_max_token_length", "16", "--max_data_loader_n_workers", "0",
        *extra,
    ]


def train_in_process(argv: list[str]) -> None:
    from accelerate.state import AcceleratorState, PartialState

    import flux_train_network

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    assert flux_train_network.main(argv) == 0


def losses(out: Path) -> list[float]:
    lines = (out / "lora_loss.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]
