"""kohya-compatible CLI: every flag, --config_file/--output_config, unknown and ineffective flags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import toml

import flux_train_network
from cli_helpers import run_in_process
from library.data.config import DatasetFlags
from library.errors import UserError
from library.train.cli import parse_args
from library.train.config import build_config, config_as_dict
from library.train.flags import DATASET_FLAGS, FLAGS, INEFFECTIVE, KOHYA_FLAG_COUNT

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "kohya-sd-scripts-flux.md"


def _example_value(flag) -> list[str]:
    if flag.kind == "flag":
        return [f"--{flag.name}"]
    if flag.choices:
        value = str(next(c for c in flag.choices if c is not None))
    else:
        value = {"int": "3", "float": "0.5", "int_or_float": "0.25", "str": "x"}[flag.kind]
    return [f"--{flag.name}", value] + ([value] if flag.nargs == "*" else [])


def test_the_table_holds_kohyas_215_flags() -> None:
    kohya = [f for f in FLAGS if f.group != "ours"]
    assert len(kohya) == KOHYA_FLAG_COUNT == 215
    assert len({f.name for f in FLAGS}) == len(FLAGS)
    if REFERENCE.is_file():  # cross-check names, defaults and choices against the reference table
        rows = re.findall(r"^\| `--(\w+)` \| (\w+) \| ([^|]*) \|", REFERENCE.read_text(), flags=re.M)
        assert {name for name, *_ in rows} == {f.name for f in kohya}
        for name, kind, default in rows:
            ours = next(f for f in kohya if f.name == name)
            assert ours.kind == ("str" if kind == "Path" else kind), name
            assert repr(ours.default) == default.strip().replace("2e-06", "2e-06") or (
                str(ours.default) == default.strip()), name


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
def test_every_flag_parses(flag, tmp_path: Path) -> None:
    argv = _example_value(flag)
    if flag.name == "config_file":
        (tmp_path / "x.toml").write_text("seed = 1\n")
        argv = ["--config_file", str(tmp_path / "x.toml")]
    parsed = parse_args(argv)
    assert flag.name in parsed.given
    assert parsed.values[flag.name] not in (None, "")


def test_a_full_kohya_command_line_builds_a_config() -> None:
    argv = ("--pretrained_model_name_or_path m.safetensors --clip_l c --t5xxl t --ae a --cache_latents_to_disk "
            "--save_model_as safetensors --sdpa --persistent_data_loader_workers --max_data_loader_n_workers 2 "
            "--seed 42 --gradient_checkpointing --mixed_precision bf16 --save_precision bf16 "
            "--network_module networks.lora_flux --network_dim 4 --network_train_unet_only "
            "--optimizer_type adamw8bit --learning_rate 8e-4 --cache_text_encoder_outputs "
            "--cache_text_encoder_outputs_to_disk --fp8_base --highvram --max_train_epochs 16 "
            "--save_every_n_epochs 4 --dataset_config d.toml --output_dir out --output_name flux-lora "
            "--timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw "
            "--guidance_scale 1.0 --loss_type l2 --optimizer_args relative_step=False").split()
    cfg = build_config(parse_args(argv))
    assert cfg.memory.cache_latents and cfg.memory.cache_text_encoder_outputs
    assert cfg.optimizer.optimizer_type == "adamw8bit" and cfg.optimizer.optimizer_args == ("relative_step=False",)
    assert cfg.objective.discrete_flow_shift == pytest.approx(3.1582)
    assert cfg.loop.max_train_epochs == 16 and cfg.save.output_name == "flux-lora"
    assert cfg.data.flags == DatasetFlags(cache_latents=True)  # implied by --cache_latents_to_disk, resolved once
    assert any("--sdpa" in w for w in cfg.warnings) and any("--highvram" in w for w in cfg.warnings)
    assert config_as_dict(cfg)["objective"]["model_prediction_type"] == "raw"


def test_dataset_flags_hold_only_given_dataset_flags_typed() -> None:
    cfg = build_config(parse_args(["--resolution", "512,768", "--train_batch_size", "2", "--learning_rate", "1"]))
    assert cfg.data.flags == DatasetFlags((("resolution", (512, 768)), ("batch_size", 2)))
    assert {"resolution", "train_batch_size", "flip_aug", "caption_extension"} <= DATASET_FLAGS


def test_implied_settings_and_aliases() -> None:
    cfg = build_config(parse_args(["--fp8_base_unet", "--mixed_precision", "bf16", "--split_mode",
                                   "--use_lion_optimizer", "--caption_extention", ".txt"]))
    assert cfg.precision.fp8_base and cfg.memory.blocks_to_swap == 18
    assert cfg.optimizer.optimizer_type == "Lion"
    assert any("split_mode" in w for w in cfg.warnings)
    # the alias is resolved once, here: the dataset layer receives caption_extension only
    assert cfg.data.flags.level == (("caption_extension", ".txt"),)
    both = build_config(parse_args(["--caption_extention", ".a", "--caption_extension", ".b", "--train_data_dir", "d",
                                    "--skip_bad_images"]))
    assert both.data.flags.level == (("caption_extension", ".b"),)  # the correct spelling wins, as in kohya
    assert both.data.train_data_dir == "d" and both.data.skip_bad_images


@pytest.mark.parametrize("argv, needle", [
    (["--blocks_to_swap", "4", "--cpu_offload_checkpointing"], "cannot be combined"),
    (["--full_bf16"], "--mixed_precision bf16"),
    (["--fp8_base"], "--fp8_base needs"),
    (["--fp8_matmul", "--mixed_precision", "fp16"], "--fp8_matmul needs --mixed_precision bf16"),
    (["--network_module", "networks.lora_sd3"], "only networks.lora_flux"),
    (["--save_every_n_steps", "0"], "--save_every_n_steps must be at least 1"),
    (["--blocks_to_swap", "40"], "0..35"),
])
def test_hard_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        build_config(parse_args(argv))


def test_config_file_precedence_and_sections(tmp_path: Path) -> None:
    file = tmp_path / "args.toml"
    file.write_text('[model]\nnetwork_dim = 8\nlearning_rate = "1e-3"\n[train]\noptimizer_args = ["a=1"]\n'
                    "gradient_checkpointing = true\n")
    parsed = parse_args(["--config_file", str(tmp_path / "args"), "--network_dim", "16"])
    assert parsed.values["network_dim"] == 16  # command line beats the file
    assert parsed.values["learning_rate"] == pytest.approx(1e-3)  # the file beats the default
    assert parsed.values["optimizer_args"] == ["a=1"] and parsed.values["gradient_checkpointing"] is True
    assert {"network_dim", "learning_rate", "gradient_checkpointing"} <= parsed.given


@pytest.mark.parametrize("text, needle", [
    ("netwrk_dim = 4\n", "unknown key 'netwrk_dim' (did you mean --network_dim?)"),
    ("network_dim = 4.5\n", "network_dim: expected an integer"),
    ("mixed_precision = 'fp32'\n", "mixed_precision: 'fp32' is not one of"),
    ("gradient_checkpointing = 1\n", "expected true or false"),
    ("network_dim = = 4\n", "not valid TOML"),
])
def test_config_file_errors(tmp_path: Path, text: str, needle: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_args(["--config_file", str(file)])


def _process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "flux_train_network.py"), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def _run(monkeypatch):
    """flux_train_network.main in this process (tests/cli_helpers.py), from the repository root."""
    monkeypatch.chdir(REPO)
    return lambda *argv: run_in_process(flux_train_network.main, list(argv))


def test_output_config_round_trip_and_no_overwrite(_run, tmp_path: Path) -> None:
    target = tmp_path / "saved.toml"
    argv = ["--config_file", str(target), "--network_dim", "32", "--optimizer_args", "betas=0.9,0.99",
            "--gradient_checkpointing", "--wandb_api_key", "secret"]
    proc = _run(*argv, "--output_config")
    assert proc.returncode == 0, proc.stderr
    saved = toml.load(target)
    assert saved == {"network_dim": 32, "optimizer_args": ["betas=0.9,0.99"], "gradient_checkpointing": True}
    again = parse_args(["--config_file", str(target)])
    assert again.values["network_dim"] == 32 and again.values["optimizer_args"] == ["betas=0.9,0.99"]
    proc = _run(*argv, "--output_config")
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_unknown_flag_exits_2_with_a_suggestion(_run) -> None:
    proc = _process("--netwrk_dim", "4")  # and once as a real process
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: command line: unknown argument --netwrk_dim (did you mean --network_dim?)"
    proc = _run("--network_dim", "four")
    assert proc.returncode == 2 and "invalid int value" in proc.stderr and "Traceback" not in proc.stderr


def test_ineffective_flag_warns_with_its_reason(_run, tmp_path: Path) -> None:
    proc = _run("--min_snr_gamma", "5", "--model_prediction_type", "raw", "--output_dir", str(tmp_path))
    assert f"warning: --min_snr_gamma has no effect for FLUX: {INEFFECTIVE['min_snr_gamma']}" in proc.stderr
    assert proc.stderr.count("warning:") == 1  # nothing else was set that does nothing
    # the early model-file check stops it, one line, before any data or model is touched
    assert proc.returncode == 2 and "--pretrained_model_name_or_path is required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_config_and_dry_run_go_to_the_data_layer(_run) -> None:
    # kohya's default --model_prediction_type sigma_scaled and an ineffective flag: training warnings,
    # which a read-only look at the data does not print
    proc = _run("--dataset_config", "dataset_configs/demo_data.toml", "--validate_config", "--min_snr_gamma", "5")
    assert proc.returncode == 0, proc.stderr
    assert "[[datasets]]" in proc.stdout and "class_tokens" in proc.stdout
    assert "warning" not in proc.stderr and "sigma_scaled" not in proc.stderr + proc.stdout, proc.stderr
    proc = _run("--dataset_config", "dataset_configs/demo_data.toml", "--dry_run", "--max_train_epochs", "3",
                "--model_prediction_type", "raw")
    assert proc.returncode == 0, proc.stderr
    assert "plan" in proc.stdout.lower()
