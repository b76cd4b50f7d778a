"""Non-finite values and hostile inputs in the LoRA tools and inference: refused with one line naming the
file and the first bad tensor (or reported, by verify_lora), never written and never turned into images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from networks import flux_extract_lora, flux_merge_lora, resize_lora, verify_lora
from networks.lora_flux import save_lora
from networks.lora_formats import read_lora
from tests.interop.helpers import random_lora, tiny_flux

REPO = Path(__file__).resolve().parents[1]
QKV = "lora_unet_double_blocks_0_img_attn_qkv"


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    base = tiny_flux()
    shape = tuple(base.double_blocks[0].img_attn.qkv.weight.shape)
    good = random_lora({QKV: shape}, rank=4)
    save_lora(good, root / "good.safetensors", torch.float32, {})
    nan = random_lora({QKV: shape}, rank=4)
    nan[QKV].up[0, 0] = float("nan")
    save_lora(nan, root / "nan.safetensors", torch.float32, {})
    big = random_lora({QKV: shape}, rank=4)
    big[QKV].up.mul_(1e6)
    save_lora(big, root / "big.safetensors", torch.float32, {})
    other = random_lora({QKV: (shape[0], shape[1] * 2)}, rank=4)
    save_lora(other, root / "other.safetensors", torch.float32, {})
    save_file({"lora_unet_x.weight": torch.zeros(2)}, str(root / "empty.safetensors"))
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(sd, str(root / "flux.safetensors"))
    sd_nan = dict(sd)
    k = "double_blocks.0.img_attn.qkv.weight"
    sd_nan[k] = sd[k].clone()
    sd_nan[k][0, 0] = float("nan")
    save_file(sd_nan, str(root / "flux_nan.safetensors"))
    return {p.stem: p for p in root.iterdir()}


def test_read_lora_refuses_a_nan_lora_naming_the_tensor(loras) -> None:
    read_lora(loras["good"])  # the control
    with pytest.raises(UserError, match=rf"nan\.safetensors: tensor '{QKV}\.lora_up\.weight' holds nan values"):
        read_lora(loras["nan"])


@pytest.mark.parametrize("args, needle", [
    (["--models", "{nan}"], "nan.safetensors: tensor"),
    (["--models", "{good}", "--ratios", "nan"], "--ratios nan: must be a finite number"),
    (["--models", "{nan}", "--new_rank", "2"], "holds nan values"),
    (["--models", "{good}", "{other}"], "these LoRAs are for different models"),
    (["--models", "{good}", "--working_device", "cuda"], "--working_device cuda: CUDA is not available"),
    (["--models", "{good}", "--flux_model", "{flux}", "--clip_l", "{flux}"], "give --clip_l_save_to too"),
    (["--models", "{good}", "--flux_model", "{flux_nan}"], "after the merge, tensor"),
])
def test_merge_refuses_before_writing(loras, tmp_path: Path, args: list[str], needle: str) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = [a.format(**{k: str(v) for k, v in loras.items()}) for a in args]
    with pytest.raises(UserError) as err:
        flux_merge_lora.main([*argv, "--save_to", str(tmp_path / "out.safetensors")])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary


def test_merge_of_good_loras_still_works(loras, tmp_path: Path) -> None:  # the control
    flux_merge_lora.main(["--models", str(loras["good"]), str(loras["good"]), "--ratios", "0.5", "0.5",
                          "--save_to", str(tmp_path / "out.safetensors")])
    assert (tmp_path / "out.safetensors").is_file()


def test_resize_refuses_nan_and_empty_loras(loras, tmp_path: Path) -> None:
    for name, needle in (("nan", "holds nan values"), ("empty", "keys not understood|no LoRA modules")):
        with pytest.raises(UserError, match=needle):
            resize_lora.main(["--model", str(loras[name]), "--new_rank", "2", "--save_to", str(tmp_path / "r.safetensors")])
    assert list(tmp_path.iterdir()) == []


def test_extract_from_a_nan_model_names_the_file_and_tensor(loras, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"flux_nan\.safetensors: tensor 'double_blocks\.0\.img_attn\.qkv\.weight'"):
        flux_extract_lora.main(["--model_org", str(loras["flux"]), "--model_tuned", str(loras["flux_nan"]),
                                "--dim", "2", "--save_to", str(tmp_path / "x.safetensors")])


def test_verify_reports_non_finite_and_absurd_values(loras, capsys) -> None:
    assert verify_lora.main([str(loras["good"]), "--loaders", "comfyui"]) == 0
    assert "PROBLEM" not in capsys.readouterr().out
    assert verify_lora.main([str(loras["nan"]), "--loaders", "comfyui"]) == 1
    assert f"values    PROBLEM: tensor {QKV}.lora_up.weight holds nan values" in capsys.readouterr().out
    assert verify_lora.main([str(loras["big"]), "--loaders", "comfyui"]) == 1
    assert "beyond ±10000" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--lora_weights", "{good};nan"], "multiplier nan must be a finite number"),
    (["--t5xxl_max_token_length", "100000"], "--t5xxl_max_token_length 100000: too large (at most 512)"),
    (["--width", "100000"], "--width 100000: too large"),
])
def test_inference_refuses_meaningless_numbers_at_parse_time(tiny_ckpts, loras, tmp_path: Path, extra, needle) -> None:
    import flux_minimal_inference as inf

    argv = [a.replace("{good}", str(loras["good"])) for a in extra]
    with pytest.raises(UserError) as err:
        inf.parse_args(["--ckpt_path", str(tiny_ckpts.transformer), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl",
                        str(tiny_ckpts.t5xxl), "--ae", str(tiny_ckpts.ae), "--prompt", "x", "--output_dir",
                        str(tmp_path), *argv])
    assert needle in str(err.value)


def test_merge_cli_exit_status_and_one_line(loras, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "networks" / "flux_merge_lora.py"), "--models",
                           str(loras["nan"]), "--save_to", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
