"""Loading the transformer and AE from every layout, and every wrong file ending in a one-line UserError."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.flux.loading import load_autoencoder, load_transformer
from library.flux.safetensors_io import open_checkpoint, save_file_atomic

REPO = Path(__file__).resolve().parents[1]


def _sd(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return ckpt.state_dict()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(tiny_ckpts):
    return (load_transformer(tiny_ckpts.transformer, "cpu", torch.float32),
            load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32))


def test_bfl_file_loads_exactly_in_the_asked_dtype(tiny_ckpts, reference):
    flux, ae = reference
    sd = _sd(tiny_ckpts.transformer)
    assert all(torch.equal(flux.state_dict()[k], sd[k].float()) for k in sd)
    bf16 = load_transformer(tiny_ckpts.transformer, "cpu", torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in bf16.parameters())
    assert {p.dtype for p in load_autoencoder(tiny_ckpts.ae, "cpu", torch.bfloat16).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("sub", ["", "transformer"])
def test_diffusers_folders(tiny_ckpts, reference, sub):
    flux, ae = reference
    assert _same(load_transformer(tiny_ckpts.diffusers / sub, "cpu", torch.float32), flux)
    vae_sub = "vae" if sub else ""
    assert _same(load_autoencoder(tiny_ckpts.diffusers / vae_sub, "cpu", torch.float32), ae)


def test_all_in_one_checkpoint(tiny_ckpts, reference, tmp_path):
    flux, ae = reference
    sd = {f"model.diffusion_model.{k}": v for k, v in _sd(tiny_ckpts.transformer).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in _sd(tiny_ckpts.ae).items()})
    sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in _sd(tiny_ckpts.clip_l).items()})
    path = tmp_path / "flux1-dev-all-in-one.safetensors"
    save_file_atomic(sd, path)
    assert _same(load_transformer(path, "cpu", torch.float32), flux)
    assert _same(load_autoencoder(path, "cpu", torch.float32), ae)


def _write_variant(src: Path, dst: Path, edit) -> Path:
    sd = _sd(src)
    edit(sd)
    save_file_atomic(sd, dst)
    return dst


def _drop_block(sd):
    for k in [k for k in sd if k.startswith("double_blocks.1.img_")]:
        del sd[k]


def _add_key(sd):
    sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(2)


def _wrong_shape(sd):
    sd["single_blocks.1.linear2.weight"] = sd["single_blocks.1.linear2.weight"][:, :-8].contiguous()


@pytest.mark.parametrize("edit, message", [
    (_drop_block, r"not a FLUX transformer: missing 12 keys \(double_blocks\.1\.img_attn\.norm\.key_norm\.scale, "),
    (_add_key, r"not a FLUX transformer: 1 unexpected keys \(double_blocks\.0\.img_attn\.extra\.weight\)"),
    (_wrong_shape, r"single_blocks\.1\.linear2\.weight: shape \(256, 1272\), expected \(256, 1280\)"),
])
def test_wrong_transformer_files(tiny_ckpts, tmp_path, edit, message):
    path = _write_variant(tiny_ckpts.transformer, tmp_path / "flux.safetensors", edit)
    with pytest.raises(UserError, match=message) as err:
        load_transformer(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_wrong_ae_file(tiny_ckpts, tmp_path):
    path = _write_variant(tiny_ckpts.ae, tmp_path / "ae.safetensors",
                          lambda sd: sd.pop("decoder.up.1.block.0.conv2.bias"))
    with pytest.raises(UserError, match=r"ae.safetensors: not a FLUX autoencoder: missing 1 keys "
                                        r"\(decoder\.up\.1\.block\.0\.conv2\.bias\)"):
        load_autoencoder(path)


def _truncated(tiny_ckpts, path: Path) -> Path:
    data = tiny_ckpts.transformer.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def _text(tiny_ckpts, path: Path) -> Path:
    path.write_text("<html>404 Not Found</html>\n")
    return path


def _pickle(tiny_ckpts, path: Path) -> Path:
    torch.save({"img_in.weight": torch.zeros(2)}, path)
    return path


def _ae_file(tiny_ckpts, path: Path) -> Path:
    return Path(shutil.copyfile(tiny_ckpts.ae, path))


def _clip_file(tiny_ckpts, path: Path) -> Path:
    return Path(shutil.copyfile(tiny_ckpts.clip_l, path))


BAD_FILES = [
    (_truncated, "truncated"),
    (_text, "not a safetensors file"),
    (_pickle, "is a pickle"),
    (_ae_file, r"not a FLUX transformer: no img_in\.weight; it looks like a FLUX autoencoder \(pass it as --ae\)"),
    (_clip_file, "it looks like a CLIP text encoder"),
]


@pytest.mark.parametrize("make, message", BAD_FILES)
def test_bad_transformer_files(tiny_ckpts, tmp_path, make, message):
    path = make(tiny_ckpts, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(UserError, match=message):
        load_transformer(path)


def test_transformer_passed_as_ae(tiny_ckpts):
    with pytest.raises(UserError, match="not a FLUX autoencoder.*it looks like a FLUX transformer"):
        load_autoencoder(tiny_ckpts.transformer)


def test_missing_paths(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_transformer(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="folder has no transformer/diffusion_pytorch_model"):
        load_transformer(tmp_path)


_CLI = ("import sys; from library.errors import run_main; from library.flux.loading import load_transformer; "
        "run_main(lambda: load_transformer(sys.argv[1]) and 0)")


@pytest.mark.parametrize("make, message", [BAD_FILES[1], BAD_FILES[2], BAD_FILES[3]])
def test_cli_exit_status_2_without_traceback(tiny_ckpts, tmp_path, make, message):
    path = make(tiny_ckpts, tmp_path / "flux1-dev.safetensors")
    proc = subprocess.run([sys.executable, "-c", _CLI, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and str(path) in lines[0]
    assert re.search(message, lines[0])


def test_make_tiny_checkpoints_cli(tmp_path):
    out = tmp_path / "ckpts"
    proc = subprocess.run([sys.executable, "tools/make_tiny_checkpoints.py", "--out", str(out), "--seed", "3",
                           "--schnell"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    flux = load_transformer(out / "flux1-tiny-schnell.safetensors", "cpu", torch.float32)
    assert not flux.params.guidance_embed
    assert (out / "FLUX.1-tiny-schnell" / "model_index.json").exists()
    bad = subprocess.run([sys.executable, "tools/make_tiny_checkpoints.py", "--out",
                          str(out / "flux1-tiny-schnell.safetensors")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")


def test_fp8_file_and_comfyui_prefix(tiny_ckpts, reference, tmp_path):
    """A ComfyUI-saved fp8 file (`diffusion_model.` prefix, e4m3 weights) loads in both modes."""
    from library.flux.model import to_fp8

    sd = _sd(tiny_ckpts.transformer)
    fp8_sd = {f"diffusion_model.{k}": (to_fp8(v) if v.ndim == 2 else v) for k, v in sd.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file_atomic(fp8_sd, path)
    up = load_transformer(path, "cpu", torch.float32)
    assert up.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
    assert torch.equal(up.img_in.weight, fp8_sd["diffusion_model.img_in.weight"].float())
    kept = load_transformer(path, "cpu", torch.float32, fp8=True)
    w = kept.single_blocks[0].linear1.weight
    assert w.dtype == torch.float8_e4m3fn
    assert torch.equal(w.view(torch.uint8), fp8_sd["diffusion_model.single_blocks.0.linear1.weight"].view(torch.uint8))
