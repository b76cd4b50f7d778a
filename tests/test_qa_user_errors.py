"""Bad input found by hand on the command line (QA pass): each case is a one-line `error:`, exit status 2,
no traceback, and no change to the user's files. One test per fix."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import Ran, run_in_process, script_main
from library.errors import UserError
from library.flux.safetensors_io import check_output_path, save_file_atomic

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str | Path) -> Ran:
    """The script's `main` in this process (tests/cli_helpers.py); the `__main__` path of each tool has its
    subprocess test elsewhere (test_lora_tools.py, test_inference.py)."""
    return run_in_process(script_main(script), list(args))


def assert_user_error(res, *expect: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), res.stderr
    for text in expect:
        assert text in last, last


def lora_file(path: Path, rank_up: int = 2, rank_down: int = 2) -> Path:
    """A kohya LoRA for the tiny model's double_blocks.0.img_attn.proj (hidden 256)."""
    save_file_atomic({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(rank_down, 256),
                      "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(256, rank_up),
                      "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(float(rank_down))}, path)
    return path


# -- writing outputs -------------------------------------------------------------------------------------

def test_save_file_atomic_gives_umask_permissions_not_0600(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        save_file_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o644  # safetensors alone writes 0600


def test_save_file_atomic_refuses_a_directory(tmp_path) -> None:
    with pytest.raises(UserError, match="is a directory"):
        save_file_atomic({"a": torch.zeros(2)}, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left behind


@pytest.mark.parametrize("dst", ["{tmp}", "{tmp}/a_file/out.safetensors"])
def test_convert_to_an_unwritable_place_is_one_line(tmp_path, dst) -> None:
    lora = lora_file(tmp_path / "in.safetensors")
    (tmp_path / "a_file").write_text("x")
    res = run("networks/convert_flux_lora.py", "--src_path", lora, "--dst_path", dst.format(tmp=tmp_path))
    assert_user_error(res, str(tmp_path))


def test_check_output_path_refuses_an_input(tmp_path) -> None:
    src = lora_file(tmp_path / "in.safetensors")
    with pytest.raises(UserError, match="--save_to is the same file as --model"):
        check_output_path(tmp_path / "." / "in.safetensors", "--save_to", {"--model": src})
    new = tmp_path / "new.safetensors"
    assert check_output_path(new, "--save_to", {"--model": src}) == new


@pytest.mark.parametrize("script,args", [
    ("networks/convert_flux_lora.py", ["--src_path", "{lora}", "--dst", "diffusers", "--dst_path", "{lora}"]),
    ("networks/resize_lora.py", ["--model", "{lora}", "--save_to", "{lora}", "--new_rank", "1"]),
    ("networks/flux_merge_lora.py", ["--save_to", "{lora}", "--models", "{lora}"]),
    ("networks/flux_merge_lora.py", ["--flux_model", "{base}", "--save_to", "{base}", "--models", "{lora}"]),
    ("networks/flux_extract_lora.py", ["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{base}"]),
])
def test_tools_never_overwrite_their_input(tiny_ckpts, tmp_path, script, args) -> None:
    lora = lora_file(tmp_path / "in.safetensors")
    base = tmp_path / "base.safetensors"
    base.write_bytes(tiny_ckpts.transformer.read_bytes())
    before = {p: p.read_bytes() for p in (lora, base)}
    res = run(script, *[a.format(lora=lora, base=base) for a in args])
    assert_user_error(res, "is the same file as", "never overwritten")
    assert {p: p.read_bytes() for p in (lora, base)} == before


# -- malformed LoRA files and SVD arguments -------------------------------------------------------------

@pytest.mark.parametrize("script,args", [
    ("networks/convert_flux_lora.py", ["--src_path", "{bad}", "--dst", "diffusers", "--dst_path", "{out}"]),
    ("networks/resize_lora.py", ["--model", "{bad}", "--save_to", "{out}", "--new_rank", "1"]),
    ("networks/flux_merge_lora.py", ["--flux_model", "{base}", "--save_to", "{out}", "--models", "{bad}"]),
    ("networks/verify_lora.py", ["{bad}"]),
])
def test_lora_whose_down_and_up_ranks_differ_is_named(tiny_ckpts, tmp_path, script, args) -> None:
    bad = lora_file(tmp_path / "bad.safetensors", rank_up=4, rank_down=2)
    out = tmp_path / "out.safetensors"
    res = run(script, *[a.format(bad=bad, out=out, base=tiny_ckpts.transformer) for a in args])
    assert_user_error(res, str(bad), "lora_unet_double_blocks_0_img_attn_proj", "do not share a rank")
    assert not out.exists()


def test_read_lora_checks_pairs(tmp_path) -> None:
    from networks.lora_formats import read_lora

    assert read_lora(lora_file(tmp_path / "ok.safetensors")).weights  # a well-formed file still loads
    with pytest.raises(UserError, match="bad.safetensors: .*do not share a rank"):
        read_lora(lora_file(tmp_path / "bad.safetensors", rank_up=3, rank_down=2))


@pytest.mark.parametrize("script,args,expect", [
    ("networks/resize_lora.py", ["--new_rank", "0"], "--new_rank 0: must be >= 1"),
    ("networks/resize_lora.py", ["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "must be >= 1"),
    ("networks/resize_lora.py", ["--dynamic_method", "sv_fro", "--dynamic_param", "2"], "fraction in (0, 1]"),
    ("networks/flux_merge_lora.py", ["--new_rank", "0"], "--new_rank 0: must be >= 1"),
])
def test_svd_ranks_and_criteria_are_checked(tmp_path, script, args, expect) -> None:
    lora, out = lora_file(tmp_path / "in.safetensors"), tmp_path / "out.safetensors"
    io = ["--model", lora, "--save_to", out] if "resize" in script else ["--models", lora, "--save_to", out]
    assert_user_error(run(script, *io, *args), expect)
    assert not out.exists()


@pytest.mark.parametrize("args,expect", [(["--dim", "0"], "--dim 0: must be >= 1"),
                                         (["--clamp_quantile", "2"], "--clamp_quantile 2.0")])
def test_extract_checks_dim_and_quantile(tiny_ckpts, tmp_path, args, expect) -> None:
    out = tmp_path / "out.safetensors"
    res = run("networks/flux_extract_lora.py", "--model_org", tiny_ckpts.transformer, "--model_tuned",
              tiny_ckpts.transformer, "--save_to", out, *args)
    assert_user_error(res, expect)


# -- flux_minimal_inference.py ---------------------------------------------------------------------------

def _infer(tiny_ckpts, out: Path, **over: str | Path) -> Ran:
    args = {"--ckpt_path": tiny_ckpts.transformer, "--clip_l": tiny_ckpts.clip_l, "--t5xxl": tiny_ckpts.t5xxl,
            "--ae": tiny_ckpts.ae, "--output_dir": out, "--width": "64", "--height": "64", "--steps": "1",
            "--dtype": "float32", "--seed": "1", **over}
    return run("flux_minimal_inference.py", *[x for kv in args.items() for x in kv])


def test_inference_wrong_ae_fails_before_sampling(tiny_ckpts, tmp_path) -> None:
    res = _infer(tiny_ckpts, tmp_path / "out", **{"--ae": tiny_ckpts.transformer})
    assert_user_error(res, str(tiny_ckpts.transformer), "not a FLUX autoencoder")
    assert "sampling" not in res.stderr  # checked from the header first, not after every step ran
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,expect", [
    ("--device", "foo", "--device 'foo': not a device"),
    ("--output_dir", "{file}", "--output_dir is not a folder"),
    ("--output_dir", "{file}/sub", "--output_dir is not a folder"),
    ("--seed", str(2**70), "out of range"),
])
def test_inference_bad_flags_are_one_line(tiny_ckpts, tmp_path, flag, value, expect) -> None:
    file = tmp_path / "a_file"
    file.write_text("keep me")
    res = _infer(tiny_ckpts, tmp_path / "out", **{flag: value.format(file=file)})
    assert_user_error(res, expect)
    assert file.read_text() == "keep me" and not list(tmp_path.rglob("*.png"))


def test_meta_device_checks_headers_without_reading_tensors(tiny_ckpts, monkeypatch) -> None:
    from library.flux import safetensors_io
    from library.flux.loading import load_autoencoder, load_transformer

    def refuse(*_a, **_k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors_io.Checkpoint, "get", refuse)
    model = load_transformer(tiny_ckpts.transformer, "meta", torch.float32)
    assert model.params.guidance_embed and next(model.parameters()).is_meta
    assert next(load_autoencoder(tiny_ckpts.ae, "meta").parameters()).is_meta
    with pytest.raises(UserError, match="not a FLUX autoencoder"):
        load_autoencoder(tiny_ckpts.transformer, "meta")


# -- run_main's last resort for unreadable / unwritable paths --------------------------------------------

def test_run_main_turns_os_errors_on_paths_into_one_line() -> None:
    code = ("from library.errors import run_main\n"
            "def main():\n    open('/nonexistent_qa/dir/x.txt', 'w')\n"
            "run_main(main)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert_user_error(res, "/nonexistent_qa/dir/x.txt", "No such file or directory")
    bug = subprocess.run([sys.executable, "-c", code.replace("open('/nonexistent_qa/dir/x.txt', 'w')",
                                                             "raise OSError('internal')")],
                         cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert bug.returncode == 1 and "Traceback" in bug.stderr  # not a path: a bug keeps its traceback


# -- dataset config and scan -----------------------------------------------------------------------------

def test_config_with_every_subset_skipped_is_an_error(tmp_path) -> None:
    from library.data.config import load_dataset_config

    (tmp_path / "img").mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    cfg = tmp_path / "d.toml"
    cfg.write_text('[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "img"\n  num_repeats = 0\n')
    with pytest.raises(UserError, match="no subset is left to train"):
        load_dataset_config(cfg)
    cfg.write_text(cfg.read_text().replace("num_repeats = 0", "num_repeats = 1"))
    assert load_dataset_config(cfg).datasets[0].subsets


def test_scan_warnings_name_the_files_and_do_not_advise_the_flag_in_use(tmp_path, caplog) -> None:
    from PIL import Image

    from library.data.scan import scan
    from library.data.config import load_dataset_config

    img = tmp_path / "img"
    img.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(img / f"{name}.png")
    (img / "a.txt").write_text("a caption")
    (img / "broken.png").write_text("not an image")
    cfg = tmp_path / "d.toml"
    cfg.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                   '  [[datasets.subsets]]\n  image_dir = "img"\n')
    with caplog.at_level(logging.WARNING):
        items = scan(load_dataset_config(cfg), skip_bad_images=True, progress=False)
    assert sorted(it.path.name for it in items[0]) == ["a.png", "b.png"]
    text = caplog.text
    assert "skipping" in text and "broken.png: cannot read image" in text
    assert "pass --skip_bad_images" not in text
    assert "no caption file" in text and str(img / "b.png") in text and str(img / "a.png") not in text


# -- a LoRA trained with train_t5xxl (lora_te3_ modules) at inference ------------------------------------

def test_t5_lora_modules_reach_t5_at_inference_merged_or_not(tiny_ckpts, tmp_path) -> None:
    from library.flux.loading import load_transformer
    from library.flux.text_encoders import FluxTextEncoders
    from networks.lora_flux import apply_lora_weights

    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    te = FluxTextEncoders.load(tiny_ckpts.clip_l, tiny_ckpts.t5xxl, "cpu", torch.float32)
    out_f, in_f = te.t5.state_dict()[q].shape
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "t5.safetensors"
    name = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    save_file_atomic({f"{name}.lora_down.weight": torch.randn(2, in_f, generator=g),
                      f"{name}.lora_up.weight": torch.randn(out_f, 2, generator=g),
                      f"{name}.alpha": torch.tensor(2.0)}, path)
    base = te.encode(["a dog"], 64).t5_out
    outs = []
    for merge in (False, True):
        te = FluxTextEncoders.load(tiny_ckpts.clip_l, tiny_ckpts.t5xxl, "cpu", torch.float32)
        transformer = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32)
        apply_lora_weights(transformer, te.clip, [(path, 1.0)], merge, t5=te.t5)
        outs.append(te.encode(["a dog"], 64).t5_out)
    assert (outs[0] - base).abs().max() > 1e-3  # the T5 LoRA is applied, not dropped as "absent"
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    # and flux_minimal_inference.py hands its T5 over (it used to stop: "none of the LoRA's modules exists")
    import flux_minimal_inference as fmi

    gen = fmi.Generator(fmi.parse_args([
        "--ckpt_path", str(tiny_ckpts.transformer), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl",
        str(tiny_ckpts.t5xxl), "--ae", str(tiny_ckpts.ae), "--dtype", "float32", "--device", "cpu",
        "--lora_weights", f"{path};1.0", "--merge_lora_weights", "--output_dir", str(tmp_path)]))
    torch.testing.assert_close(gen.text_encoders.encode(["a dog"], 64).t5_out, outs[1], rtol=1e-4, atol=1e-5)


def test_every_undecodable_caption_is_reported_at_once_and_utf16_bom_is_read(tmp_path) -> None:
    from PIL import Image

    from library.data.scan import scan
    from library.data.config import load_dataset_config

    img = tmp_path / "img"
    img.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64)).save(img / f"{name}.png")
    (img / "a.txt").write_bytes("café au lait".encode("latin-1"))
    (img / "b.txt").write_bytes(b"\xff\xfe\xff")  # a BOM, then half a UTF-16 code unit
    (img / "c.txt").write_text("a notepad caption", encoding="utf-16")  # BOM + UTF-16LE
    cfg = tmp_path / "d.toml"
    cfg.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                   '  [[datasets.subsets]]\n  image_dir = "img"\n')
    with pytest.raises(UserError) as err:
        scan(load_dataset_config(cfg), progress=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "a.txt: caption file is not UTF-8" in lines[0] and "b.txt" in lines[1]
    (img / "a.txt").write_text("café au lait")
    (img / "b.txt").unlink()
    items = {it.path.name: it for it in scan(load_dataset_config(cfg), progress=False)[0]}
    assert items["a.png"].captions == ("café au lait",) and items["c.png"].captions == ("a notepad caption",)
