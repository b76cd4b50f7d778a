"""End-to-end training through flux_train_network.py on tiny checkpoints and 32 px real images (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

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
        f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{root / "pair"}"\nclass_tokens = "sks dog"\n')
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


def test_thirty_steps_lower_the_loss_and_write_everything(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "30", "--learning_rate", "5e-3",
                               "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "15"))
    got = losses(out)
    assert len(got) == 30
    first, last = sum(got[:3]) / 3, sum(got[-5:]) / 5
    assert last < 0.6 * first, (first, last, got)
    sd = load_file(str(out / "lora.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd and all(
        v.dtype == torch.float32 for v in sd.values())
    assert sorted(p.name for p in (out / "sample").iterdir()) == [
        "lora_000015_00_a_photo_of_sks_dog.png", "lora_000015_01_a_cat.png",
        "lora_000030_00_a_photo_of_sks_dog.png", "lora_000030_01_a_cat.png"]
    with Image.open(out / "sample" / "lora_000030_01_a_cat.png") as im:
        assert im.size == (80, 64) and "CFG scale: 2" in im.text["parameters"]
    # the last preview is what the inference script gives for the same seed with the final LoRA
    proc = subprocess.run([sys.executable, str(REPO / "flux_minimal_inference.py"), "--ckpt_path",
                           str(tiny_ckpts.transformer), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl",
                           str(tiny_ckpts.t5xxl), "--ae", str(tiny_ckpts.ae), "--prompt", "a photo of sks dog",
                           "--width", "64", "--height", "64", "--seed", "5", "--steps", "3", "--guidance", "3.5",
                           "--t5xxl_max_token_length", "16", "--dtype", "fp32", "--device", "cpu",
                           "--lora_weights", str(out / "lora.safetensors"), "--output_dir", str(tmp_path / "inf"),
                           "--output_name", "inf"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import numpy as np

    with Image.open(out / "sample" / "lora_000030_00_a_photo_of_sks_dog.png") as a, \
            Image.open(next((tmp_path / "inf").glob("inf*.png"))) as b:
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1, diff.max()
    with Image.open(out / "lora_loss.png") as im:
        assert im.size == (800, 450)
    assert (out / "lora_config.json").is_file() and "network_dim = 4" in (out / "lora_args.toml").read_text()


def _state_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith("-state"))


def test_resume_after_step_k_equals_the_uninterrupted_run(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    common = ("--max_train_steps", "6", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
              "--gradient_accumulation_steps", "1")
    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process(base_args(tiny_ckpts, data, a, *common, "--save_every_n_steps", "3", "--save_state"))
    assert _state_names(a) == ["lora-state", "lora-step00000003-state"]
    train_in_process(base_args(tiny_ckpts, data, b, *common, "--resume", str(a / "lora-step00000003-state")))
    full, resumed = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k  # bit for bit
    step3 = load_file(str(a / "lora-step00000003.safetensors"))
    assert any(not torch.equal(step3[k], full[k]) for k in full)  # the last 3 steps did change the LoRA
    assert losses(b)[:3] == losses(a)[:3] and losses(b)[3:] == losses(a)[3:]


def test_sigterm_saves_a_loadable_state_and_lora(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "flux_train_network.py"),
                             *base_args(tiny_ckpts, data, out, "--max_train_steps", "10000")],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until the loop runs
        if "start training" in line or time.time() > deadline:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert "continue with --resume" in rest
    states = _state_names(out)
    assert len(states) == 1 and states[0].startswith("lora-step")
    from library.train.checkpoint import load_state

    state = load_state(out / states[0])
    step = state.train_state["global_step"]
    assert step >= 1 and (out / f"lora-step{step:08d}.safetensors").is_file()
    lora = load_file(str(out / f"lora-step{step:08d}.safetensors"))
    assert torch.equal(lora["lora_unet_single_blocks_1_linear2.lora_up.weight"],
                       state.network["lora_unet_single_blocks_1_linear2.lora_up.weight"])


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_file(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "flux_train_network.py"),
                           *base_args(tiny_ckpts, data, out, "--max_train_steps", "50", "--learning_rate", "1e30",
                                      "--optimizer_type", "SGDNesterov", "--max_grad_norm", "0",
                                      "--save_every_n_steps", "1", "--save_last_n_steps", "1")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    msg = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(msg) == 1 and "training stopped: the loss is" in msg[0] and "Traceback" not in proc.stderr
    assert not (out / "lora.safetensors").exists()
    kept = sorted(p.name for p in out.glob("lora-step*.safetensors"))
    assert kept and kept[-1] in msg[0]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / kept[-1])).values())


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


def test_two_gloo_processes_match_one_process_at_twice_the_batch(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    def args(out: Path, batch: int) -> list[str]:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--train_batch_size", str(batch),
                      "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
        a[a.index("--dataset_config") + 1] = str(data / "dog.toml")
        return a

    one, two = tmp_path / "one", tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29517"]
    proc = subprocess.run([*launcher, str(REPO / "flux_train_network.py"), *args(two, 1)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("effective configuration") == 1  # only rank 0 prints and writes
    assert len(list((data / "pair" / ".flux_cache").rglob("*.safetensors"))) >= 2  # both ranks' shares cached
    train_in_process(args(one, 2))  # one process, twice the batch, reading the same disk caches
    a, b = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:  # relative error per tensor: Adam's m/sqrt(v) amplifies summation-order noise in tiny gradients
        if a[k].norm() > 0:
            worst = max(worst, float((b[k] - a[k]).norm() / a[k].norm()))
    assert worst < 1e-3, worst
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # the LoRA did train
    la, lb = losses(one), losses(two)  # the logged loss is the global batch's (averaged over the ranks)
    assert lb == pytest.approx(la, rel=1e-4)


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


def test_launch_script_demo_from_a_clean_copy(tmp_path: Path) -> None:
    """The README's main-job command: `bash launch_train.sh` with no model set trains the tiny demo."""
    import shutil

    clone = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    env = {**os.environ, "DEMO_EPOCHS": "2", "PYTHON": sys.executable,
           "ACCELERATE": str(Path(sys.executable).parent / "accelerate")}
    proc = subprocess.run(["bash", "launch_train.sh", "--save_every_n_epochs", "1", "--sample_every_n_epochs", "2"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = clone / "demo_output"
    assert (out / "demo_lora.safetensors").is_file() and (out / "demo_lora-000001.safetensors").is_file()
    assert (out / "demo_lora_loss.png").is_file() and (out / "demo_lora-state").is_dir()
    assert len(list((out / "sample").glob("demo_lora_e000002_*.png"))) == 2
    assert not list(clone.glob("dataset_configs/data/*/.flux_cache"))  # the demo writes nothing into the repo


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


def test_validation_loss_on_held_out_images(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_in_process(base_args(tiny_ckpts, data, out, "--max_train_steps", "4", "--validation_split", "0.5",
                               "--validate_every_n_steps", "2", "--validate_every_n_epochs", "100"))
    rows = [line.split(",") for line in (out / "lora_loss.csv").read_text().splitlines()[1:]]
    val = {int(r[0]): float(r[2]) for r in rows if r[2]}
    assert sorted(val) == [2, 4]
    assert val[2] != val[4] and all(0 < v < 10 for v in val.values())


def test_gradient_accumulation_equals_the_larger_batch(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    def run(out: Path, batch: int, accum: int) -> dict:
        a = base_args(tiny_ckpts, data, out, "--max_train_steps", "3", "--train_batch_size", str(batch),
                      "--gradient_accumulation_steps", str(accum))
        a[a.index("--dataset_config") + 1] = str(data / "dog.toml")
        train_in_process(a)
        return load_file(str(out / "lora.safetensors"))

    big, accumulated = run(tmp_path / "big", 2, 1), run(tmp_path / "acc", 1, 2)
    for k in big:
        if big[k].norm() > 0:
            assert float((accumulated[k] - big[k]).norm() / big[k].norm()) < 1e-3, k
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-4)
