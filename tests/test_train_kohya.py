"""kohya-style command lines: Prodigy/compile/caching, folder mode, schnell warm start, live encoding."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from train_helpers import data, base_args, train_in_process, losses  # noqa: F401 (data: a fixture)


def test_kohya_style_command_line_runs(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    """Prodigy + cosine_with_restarts + rank 256 + flux_shift + raw + torch.compile + all four caching flags."""
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out) + [
        "--optimizer_type", "Prodigy", "--optimizer_args", "decouple=True", "weight_decay=0.01", "d_coef=1",
        "use_bias_correction=True", "--learning_rate", "1.0", "--lr_scheduler", "cosine_with_restarts",
        "--lr_scheduler_num_cycles", "2", "--network_dim", "256", "--network_alpha", "128",
        "--timestep_sampling", "flux_shift", "--model_prediction_type", "raw", "--torch_compile",
        "--cache_latents", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
        "--cache_text_encoder_outputs_to_disk", "--gradient_checkpointing", "--max_train_steps", "3",
        "--guidance_scale", "1.0", "--sdpa", "--save_precision", "bf16",
        "--dynamo_backend", "aot_eager"]  # inductor codegen takes minutes on 2 CPU cores; the GPU runs use it
    train_in_process(argv)
    sd = load_file(str(out / "lora.safetensors"))
    down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert down.shape[0] == 256 and down.dtype == torch.bfloat16
    assert len(losses(out)) == 3 and all(torch.isfinite(torch.tensor(losses(out))))
    assert list((data / "dog").glob(".flux_cache/**/*")), "latents were cached to disk beside the images"


def test_kohya_folder_mode_and_initial_step(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    folders = tmp_path / "img"
    (folders / "2_sks dog").mkdir(parents=True)
    (folders / "notes").mkdir()  # no <repeats>_ prefix: skipped with a warning
    for p in (data / "dog").glob("*.jpg"):
        (folders / "2_sks dog" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    argv = base_args(tiny_ckpts, data, out, "--max_train_steps", "4", "--initial_step", "2",
                     "--skip_until_initial_step", "--train_data_dir", str(folders), "--resolution", "32",
                     "--train_batch_size", "2")
    i = argv.index("--dataset_config")
    del argv[i: i + 2]
    train_in_process(argv)
    generated = (out / "lora_dataset.toml").read_text()
    assert 'class_tokens = "sks dog"' in generated and "num_repeats = 2" in generated and "notes" not in generated
    rows = (out / "lora_loss.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["3", "4"]  # started at step 2, trained steps 3 and 4


def test_schnell_warm_start_from_lora_weights(tiny_ckpts, tiny_ckpts_schnell, data: Path, tmp_path: Path) -> None:
    """FLUX.1-schnell (no guidance embedding) starting from a LoRA file shaped by --dim_from_weights."""
    first, second = tmp_path / "first", tmp_path / "second"
    schnell = type(tiny_ckpts)(**{**tiny_ckpts.__dict__, "transformer": tiny_ckpts_schnell.transformer,
                                  "guidance_embed": False})
    train_in_process(base_args(schnell, data, first, "--max_train_steps", "2", "--network_dim", "6"))
    start = load_file(str(first / "lora.safetensors"))
    train_in_process(base_args(schnell, data, second, "--max_train_steps", "1", "--network_dim", "2",
                               "--network_weights", str(first / "lora.safetensors"), "--dim_from_weights"))
    end = load_file(str(second / "lora.safetensors"))
    key = "lora_unet_single_blocks_0_linear1.lora_down.weight"
    assert end[key].shape[0] == 6  # the rank came from the file, not from --network_dim
    assert not torch.equal(end[key], start[key]) and (end[key] - start[key]).abs().max() < 0.1
    from safetensors import safe_open

    with safe_open(str(second / "lora.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"
        assert f.metadata()["ss_network_dim"] == "6"
        datasets = json.loads(f.metadata()["ss_datasets"])  # kohya's ss_datasets + our caption_extension
    assert [(s["image_dir"], s["img_count"], s["caption_extension"], s.get("class_tokens"))
            for s in datasets[0]["subsets"]] == [("dog", 2, ".txt", "sks dog"), ("captioned", 2, ".txt", None)]
    assert datasets[0]["num_train_images"] == 4 and datasets[0]["batch_size_per_device"] == 2


def test_live_encoding_clip_lora_and_tensorboard(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    """kohya's default path: no caches (AE and text encoders run every step) and a CLIP-L LoRA trained too."""
    out = tmp_path / "out"
    argv = [a for a in base_args(tiny_ckpts, data, out, "--max_train_steps", "2", "--logging_dir",
                                 str(tmp_path / "logs"), "--log_with", "tensorboard", "--text_encoder_lr", "1e-3")
            if a not in ("--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only")]
    train_in_process(argv)
    sd = load_file(str(out / "lora.safetensors"))
    te = [k for k in sd if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert te and any(sd[k].abs().max() > 0 for k in te)  # the CLIP-L LoRA received updates
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/current", "loss/average", "time/step_s"} <= set(tags)
    assert any(t.startswith("lr/unet") for t in tags) and any(t.startswith("lr/textencoder") for t in tags)
