"""Early failures and console output of flux_train_network.py: bad flags, folders and model files fail in
setup's preflight, before the image scan and any model load (a tripwire on those steps proves the order);
the model files are checked from their headers only; the console gets a short configuration summary."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flux_train_network
from library.errors import UserError
from library.flux import safetensors_io
from library.flux.text_encoders import load_clip_l, load_t5xxl
from library.train import setup as train_setup
from library.train import trainer
from library.train.cli import parse_args
from library.train.config import build_config, config_as_dict
from library.train.reporting import warn


class _TooLate(Exception):
    """Raised by the tripwires: the run got past preflight."""


def _args(ckpts, tmp_path: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpts.transformer), "--clip_l", str(ckpts.clip_l),
            "--t5xxl", str(ckpts.t5xxl), "--ae", str(ckpts.ae), "--dataset_config", str(tmp_path / "none.toml"),
            "--network_module", "networks.lora_flux", "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "1", "--model_prediction_type", "raw", *extra]


@pytest.fixture
def tripwire(monkeypatch):
    """The image scan and every model load raise _TooLate; the accelerator state is fresh."""
    from accelerate.state import AcceleratorState, PartialState

    def too_late(*args, **kwargs):
        raise _TooLate()

    monkeypatch.setattr(train_setup, "_data", too_late)
    monkeypatch.setattr(train_setup.M, "load_models", too_late)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_good_arguments_pass_preflight(tiny_ckpts, tmp_path: Path, tripwire) -> None:
    """The control for the tests below: valid flags and files get as far as the image scan."""
    with pytest.raises(_TooLate):
        flux_train_network.main(_args(tiny_ckpts, tmp_path, "--network_args", "train_double_block_indices=0-1",
                                      "--optimizer_args", "betas=0.9,0.99"))


@pytest.mark.parametrize("extra, needle", [
    (["--network_args", "foo=1"], "--network_args: unknown key 'foo'"),
    (["--network_args", "rank_dropout=much"], "rank_dropout='much'"),
    (["--network_args", "train_double_block_indices=0-5"], "0-5 is outside 0-1"),  # the tiny model has 2
    (["--optimizer_type", "Foo"], "--optimizer_type Foo: unknown"),
    (["--optimizer_args", "foo=1"], "--optimizer_args for AdamW: AdamW.__init__() got an unexpected keyword"),
    (["--optimizer_args", "betas=2,3"], "--optimizer_args for AdamW: Invalid beta"),
    (["--output_dir", "{file}"], "--output_dir {file}: exists and is not a folder"),
    (["--output_dir", "{file}/sub"], "--output_dir {file}/sub: {file} is not a folder"),
    (["--logging_dir", "{file}/logs"], "--logging_dir {file}/logs: {file} is not a folder"),
    (["--network_weights", "{file}"], "{file}: not a safetensors file"),
    (["--base_weights", "{file}.missing"], "{file}.missing: no such file"),
])
def test_bad_flags_fail_before_data_and_models(tiny_ckpts, tmp_path: Path, tripwire, capsys, extra: list[str],
                                              needle: str) -> None:
    file = tmp_path / "afile"
    file.write_text("x")
    argv = [x.replace("{file}", str(file)) for x in extra]
    with pytest.raises(UserError) as err:
        flux_train_network.main(_args(tiny_ckpts, tmp_path, *argv))
    assert needle.replace("{file}", str(file)) in str(err.value)
    assert capsys.readouterr().out == ""  # nothing printed before the error (no configuration dump)
    assert not (tmp_path / "out").exists()


def test_wrong_model_files_fail_from_their_headers(tiny_ckpts, tmp_path: Path, tripwire, monkeypatch) -> None:
    """Each model flag given another component's file: a one-line error naming that file, with no tensor read."""
    def no_read(self, key):
        raise AssertionError(f"tensor {key} read; the preflight check must use the header only")

    monkeypatch.setattr(safetensors_io.Checkpoint, "get", no_read)
    swaps = {"--pretrained_model_name_or_path": tiny_ckpts.ae, "--clip_l": tiny_ckpts.t5xxl,
             "--t5xxl": tiny_ckpts.clip_l, "--ae": tiny_ckpts.transformer}
    for flag, wrong in swaps.items():
        argv = _args(tiny_ckpts, tmp_path)
        argv[argv.index(flag) + 1] = str(wrong)
        with pytest.raises(UserError, match=str(wrong)):
            flux_train_network.main(argv)
    truncated = tmp_path / "ae.safetensors"
    truncated.write_bytes(Path(tiny_ckpts.ae).read_bytes()[:-100])
    argv = _args(tiny_ckpts, tmp_path)
    argv[argv.index("--ae") + 1] = str(truncated)
    with pytest.raises(UserError, match=str(truncated)):
        flux_train_network.main(argv)


def test_text_encoder_header_check(tiny_ckpts, tmp_path: Path, monkeypatch) -> None:
    """load_clip_l / load_t5xxl on the meta device: keys and shapes checked, nothing read."""
    reshaped = tmp_path / "clip_bad.safetensors"
    sd = load_file(str(tiny_ckpts.clip_l))
    key = "text_model.encoder.layers.0.mlp.fc2.weight"
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(reshaped))
    extra = tmp_path / "t5_extra.safetensors"
    sd = load_file(str(tiny_ckpts.t5xxl))
    sd["encoder.stray.weight"] = torch.zeros(2)
    save_file(sd, str(extra))

    monkeypatch.setattr(safetensors_io.Checkpoint, "get", lambda self, key: pytest.fail(f"read {key}"))
    clip = load_clip_l(tiny_ckpts.clip_l, "meta", torch.float32)
    t5 = load_t5xxl(tiny_ckpts.t5xxl, "meta", torch.float32)
    assert all(p.is_meta for p in [*clip.parameters(), *t5.parameters()])
    with pytest.raises(UserError, match=f"wrong shape for {key}"):
        load_clip_l(reshaped, "meta", torch.float32)
    with pytest.raises(UserError, match="unexpected key.*encoder.stray.weight"):
        load_t5xxl(extra, "meta", torch.float32)


def test_configuration_summary_and_saved_file(tmp_path: Path, capsys) -> None:
    cfg = build_config(parse_args([
        "--pretrained_model_name_or_path", "flux1-dev.safetensors", "--clip_l", "clip_l.safetensors",
        "--t5xxl", "t5xxl_fp16.safetensors", "--ae", "ae.safetensors", "--dataset_config", "data.toml",
        "--network_dim", "16", "--network_alpha", "8", "--network_args", "train_blocks=single",
        "--optimizer_type", "Prodigy", "--learning_rate", "1", "--lr_scheduler", "cosine",
        "--max_train_steps", "500", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--cache_latents_to_disk", "--output_dir", str(tmp_path), "--output_name", "mine",
        "--wandb_api_key", "secret"]))
    train_setup._write_config(cfg, tmp_path)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert 5 <= len(lines) <= 14 and "{" not in out and "secret" not in out, out
    for needle in ("flux1-dev.safetensors", "t5xxl_fp16.safetensors", "data.toml", "dim 16, alpha 8",
                   "train_blocks=single", "Prodigy", "500 steps", "cosine", "mixed_precision=bf16",
                   "gradient_checkpointing", "cache_latents_to_disk", f"{tmp_path}/mine.safetensors"):
        assert needle in out, (needle, out)
    saved = tmp_path / "mine_config.json"
    assert lines[-1].strip() == f"full configuration: {saved}"
    assert json.loads(saved.read_text()) == config_as_dict(cfg)  # the whole tree is still kept


def test_log_lines_and_warnings_print_above_the_progress_bar(monkeypatch, capsys) -> None:
    from tqdm import tqdm

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    console = logging.StreamHandler(sys.stderr)
    root.handlers[:] = [console]
    root.setLevel(logging.INFO)
    seen: list[str] = []

    def fake_train(cfg, *_) -> None:  # what the loop does: a bar on stderr, then log lines and a warning
        bar = tqdm(total=3, desc="steps", file=sys.stderr)
        seen.extend(type(h).__name__ for h in root.handlers)
        logging.getLogger("library.train.trainer").info("start training")
        warn("something")
        bar.close()

    monkeypatch.setattr(trainer, "_train", fake_train)
    try:
        trainer.train(None)
        assert root.handlers == [console]  # restored after training
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert seen == ["_TqdmLoggingHandler"]
    segments = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "start training" in segments and "warning: something" in segments  # each on a line of its own
