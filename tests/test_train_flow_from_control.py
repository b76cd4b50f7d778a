"""--flow_from_control (+ --control_noise_std, + the perceptual loss) trains end to end on degradation pairs,
records its objective in the LoRA, and inference with that LoRA honours it by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from safetensors import safe_open

from library.sampling import read_png_settings
from tests.test_perceptual import vgg_state_dict
from train_helpers import base_args, data, losses, train_in_process  # noqa: F401 (data: a fixture)


@pytest.mark.slow
def test_flow_from_control_run_records_and_inference_honours_its_objective(tiny_ckpts, data: Path,
                                                                          tmp_path: Path) -> None:
    import flux_minimal_inference as fmi

    vgg = tmp_path / "vgg16.safetensors"
    save_file(vgg_state_dict(), str(vgg))
    toml = tmp_path / "restore.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\n'
                    f'image_dir = "{data / "dog"}"\nclass_tokens = "restore this photo"\n'
                    '[datasets.subsets.degradation]\nops = ["downsample", "noise"]\n'
                    'downsample = [2, 4]\nnoise_sigma = [0.02, 0.05]\nvariants = 2\n')
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "16", "--learning_rate", "5e-3",
                     "--flow_from_control", "--control_noise_std", "0.1", "--perceptual_loss_weight", "0.05",
                     "--perceptual_model", str(vgg), "--perceptual_every_n_steps", "2", "--no_metadata")
    argv[argv.index("--dataset_config") + 1] = str(toml)
    train_in_process(argv)
    got = losses(out)
    assert len(got) == 16 and all(torch.isfinite(torch.tensor(got)))
    assert sum(got[-4:]) / 4 < sum(got[:4]) / 4, got
    lora = out / "lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        md = f.metadata()
    # written even with --no_metadata: inference depends on it
    assert (md["ss_flux_objective"], md["ss_control_noise_std"], md["ss_flux_reference_tokens"]) == \
        ("flow_from_control", "0.1", "False")
    control = next((data / "dog").glob("*.jpg"))
    common = ["--ckpt_path", str(tiny_ckpts.transformer), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl",
              str(tiny_ckpts.t5xxl), "--ae", str(tiny_ckpts.ae), "--lora_weights", str(lora), "--width", "64",
              "--height", "48", "--steps", "2", "--seed", "1", "--dtype", "fp32", "--device", "cpu",
              "--output_dir", str(tmp_path / "png"), "--control_image", str(control)]
    assert fmi.main(common + ["--output_name", "auto"]) == 0
    meta = read_png_settings(tmp_path / "png" / "auto.png")
    assert (meta["objective"], meta["control_noise_std"], meta["reference_tokens"]) == ("flow_from_control", 0.1,
                                                                                        False)
    assert fmi.main(common + ["--output_name", "noise", "--objective", "noise"]) == 0
    assert read_png_settings(tmp_path / "png" / "noise.png")["objective"] == "noise"
