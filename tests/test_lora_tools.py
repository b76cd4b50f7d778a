"""The LoRA tools: convert, merge (into a base / combine), extract, resize, verify - on small known cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from networks import convert_flux_lora, flux_extract_lora, flux_merge_lora, resize_lora, verify_lora
from networks import lora_keys as K
from networks.lora_flux import save_lora
from networks.lora_formats import LoRAWeight, read_lora, to_diffusers
from tests.interop.helpers import random_lora, tiny_flux

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = {k: v.contiguous() for k, v in tiny_flux().state_dict().items()}
    path = tmp_path_factory.mktemp("base") / "flux.safetensors"
    save_file(sd, str(path))
    return path, sd


def block_shapes(sd: dict[str, torch.Tensor], only: str = "") -> dict[str, tuple[int, int]]:
    return {K.kohya_name("transformer", k[:-7]): tuple(v.shape) for k, v in sd.items()
            if k.startswith(("double_blocks", "single_blocks")) and k.endswith(".weight") and v.ndim == 2
            and only in k}


def test_convert_round_trip_and_errors(tmp_path):
    ws = random_lora({"lora_unet_double_blocks_0_img_attn_qkv": (24, 8), "lora_unet_single_blocks_0_linear1": (56, 8),
                      "lora_te1_text_model_encoder_layers_0_mlp_fc1": (16, 4)}, rank=4, alpha=2.0)
    save_lora(ws, tmp_path / "k.safetensors", torch.float32, {"ss_network_dim": "4"})
    convert_flux_lora.main(["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path", str(tmp_path / "k.safetensors"),
                            "--dst_path", str(tmp_path / "d.safetensors")])
    d = load_file(str(tmp_path / "d.safetensors"))
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in d) and not any(k.endswith("alpha") for k in d)
    convert_flux_lora.main(["--dst", "sd-scripts", "--src_path", str(tmp_path / "d.safetensors"),
                            "--dst_path", str(tmp_path / "k2.safetensors")])
    back = read_lora(tmp_path / "k2.safetensors").weights
    for n, w in ws.items():
        assert torch.allclose(back[n].delta(), w.delta(), atol=1e-6)
    with pytest.raises(UserError, match="--src sd-scripts"):
        convert_flux_lora.convert(tmp_path / "d.safetensors", tmp_path / "x.safetensors", "comfyui", "sd-scripts")
    sd = load_file(str(tmp_path / "k.safetensors"))
    sd["lora_unet_img_inn.lora_down.weight"] = torch.zeros(1, 1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="not understood"):
        convert_flux_lora.convert(tmp_path / "bad.safetensors", tmp_path / "x.safetensors", "diffusers")
    info = convert_flux_lora.convert(tmp_path / "bad.safetensors", tmp_path / "x.safetensors", "diffusers",
                                     drop_unknown=True)
    assert info["dropped"] == ["lora_unet_img_inn.lora_down.weight"]


def test_cli_user_error_exit_2(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "networks" / "convert_flux_lora.py"), "--src_path",
                          str(tmp_path / "missing.safetensors"), "--dst_path", str(tmp_path / "o.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_merge_into_base(base, tmp_path):
    path, sd = base
    l1 = random_lora(block_shapes(sd, "double_blocks.0."), rank=4, alpha=2.0, seed=1)
    l2 = random_lora(block_shapes(sd, "single_blocks.1."), rank=2, alpha=None, seed=2)
    save_lora(l1, tmp_path / "a.safetensors", torch.float32, {})
    (tmp_path / "b").mkdir()
    save_file(to_diffusers(l2), str(tmp_path / "b" / "b.safetensors"))  # another format on purpose
    args = ["--flux_model", str(path), "--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b/b.safetensors"),
            "--ratios", "0.5", "-1.5"]
    flux_merge_lora.main(args + ["--save_to", str(tmp_path / "m.safetensors"), "--save_precision", "float"])
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert set(merged) == set(sd)
    for name, w in l1.items():
        key = K.split_kohya_name(name)[1] + ".weight"
        assert torch.allclose(merged[key], sd[key] + 0.5 * w.delta(), atol=1e-6)
    for name, w in l2.items():
        key = K.split_kohya_name(name)[1] + ".weight"
        assert torch.allclose(merged[key], sd[key] - 1.5 * w.delta(), atol=1e-5)
    assert torch.equal(merged["final_layer.linear.weight"], sd["final_layer.linear.weight"])
    flux_merge_lora.main(args + ["--save_to", str(tmp_path / "m8.safetensors"), "--save_precision", "fp8"])
    m8 = load_file(str(tmp_path / "m8.safetensors"))
    assert m8["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert m8["img_in.weight"].dtype == torch.bfloat16
    assert m8["double_blocks.0.img_attn.qkv.bias"].dtype == torch.bfloat16
    with pytest.raises(UserError, match="--ratios"):
        flux_merge_lora.main(args[:-1] + ["--save_to", str(tmp_path / "x.safetensors")])


def test_combine_concat_exact_and_svd(tmp_path):
    shapes = {"lora_unet_double_blocks_0_img_mlp_0": (32, 8), "lora_unet_single_blocks_0_linear2": (8, 40)}
    a, b = random_lora(shapes, 2, 1.0, seed=1), random_lora(shapes, 2, 4.0, seed=2)
    save_lora(a, tmp_path / "a.safetensors", torch.float32, {})
    save_lora(b, tmp_path / "b.safetensors", torch.float32, {})
    models = ["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--ratios", "0.3", "2"]
    for extra, out in (([], "c"), (["--concat", "--shuffle"], "cs"), (["--new_rank", "4"], "svd")):
        flux_merge_lora.main(models + extra + ["--save_to", str(tmp_path / f"{out}.safetensors")])
        got = read_lora(tmp_path / f"{out}.safetensors").weights
        for n in shapes:
            assert got[n].rank == 4
            assert torch.allclose(got[n].delta(), 0.3 * a[n].delta() + 2 * b[n].delta(), atol=1e-5), (out, n)
    flux_merge_lora.main(models + ["--new_rank", "1", "--save_to", str(tmp_path / "r1.safetensors")])
    got = read_lora(tmp_path / "r1.safetensors").weights
    target = 0.3 * a[next(iter(shapes))].delta() + 2 * b[next(iter(shapes))].delta()
    u, s, vh = torch.linalg.svd(target)
    assert torch.allclose(got[next(iter(shapes))].delta(), s[0] * u[:, :1] @ vh[:1], atol=1e-5)  # Eckart–Young


def test_extract_rank_and_energy(base, tmp_path):
    path, sd = base
    gen = torch.Generator().manual_seed(0)
    tuned = dict(sd)
    changed = ["double_blocks.1.txt_mlp.2.weight", "single_blocks.0.linear1.weight"]
    for k in changed:
        o, i = sd[k].shape
        tuned[k] = sd[k] + torch.randn(o, 3, generator=gen) @ torch.randn(3, i, generator=gen) * 0.01
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    flux_extract_lora.main(["--model_org", str(path), "--model_tuned", str(tmp_path / "tuned.safetensors"),
                            "--save_to", str(tmp_path / "e.safetensors"), "--dim", "3", "--clamp_quantile", "1.0"])
    got = read_lora(tmp_path / "e.safetensors").weights
    assert set(got) == {K.kohya_name("transformer", k[:-7]) for k in changed}  # unchanged modules skipped
    for k in changed:
        assert torch.allclose(got[K.kohya_name("transformer", k[:-7])].delta(), tuned[k] - sd[k], atol=1e-5)
    w, ret = flux_extract_lora.extract(path, tmp_path / "tuned.safetensors", None, 0.999, None)
    assert {x.rank for x in w.values()} == {3} and min(ret.values()) > 0.999
    w, ret = flux_extract_lora.extract(path, tmp_path / "tuned.safetensors", 1, None, None)
    assert {x.rank for x in w.values()} == {1} and max(ret.values()) < 1.0


def test_resize_keeps_delta_and_reports_norm(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(32, 2, generator=gen) @ torch.randn(2, 8, generator=gen)  # an up@down of true rank 2
    w = LoRAWeight(torch.linalg.qr(torch.randn(8, 8, generator=gen))[0][:6], low @ torch.linalg.qr(
        torch.randn(8, 8, generator=gen))[0][:6].T, 3.0)
    noisy = random_lora({"lora_unet_single_blocks_0_linear2": (8, 40)}, rank=8, alpha=8.0)
    save_lora({"lora_unet_double_blocks_0_img_mlp_0": w, **noisy}, tmp_path / "r.safetensors", torch.float32, {})
    resize_lora.main(["--model", str(tmp_path / "r.safetensors"), "--save_to", str(tmp_path / "o.safetensors"),
                      "--new_rank", "4", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9999", "--verbose"])
    out = read_lora(tmp_path / "o.safetensors").weights
    assert out["lora_unet_double_blocks_0_img_mlp_0"].rank == 2
    assert torch.allclose(out["lora_unet_double_blocks_0_img_mlp_0"].delta(), w.delta(), atol=1e-4)
    assert out["lora_unet_single_blocks_0_linear2"].rank == 4
    text = capsys.readouterr().out
    assert "lora_unet_double_blocks_0_img_mlp_0: rank 6 → 2, retained norm 1.0000" in text
    assert "lora_unet_single_blocks_0_linear2: rank 8 → 4, retained norm 0." in text


def _verify(path: Path) -> dict:
    reps = verify_lora.verify(path)
    return {r.loader: r for r in reps}


def test_verify_rules(tmp_path):
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (24, 8), "lora_unet_single_blocks_0_linear2": (8, 40),
              "lora_te1_text_model_encoder_layers_0_mlp_fc1": (16, 4)}
    save_lora(random_lora(shapes), tmp_path / "ok.safetensors", torch.float32, {})
    assert verify_lora.main([str(tmp_path / "ok.safetensors")]) == 0
    assert all(r.ok and len(r.used) == 9 for r in _verify(tmp_path / "ok.safetensors").values())
    save_lora(random_lora({**shapes, "lora_unet_img_in": (8, 16)}), tmp_path / "in.safetensors", torch.float32, {})
    reps = _verify(tmp_path / "in.safetensors")
    assert reps["comfyui"].ok and reps["kohya"].ok
    assert reps["diffusers"].dropped == ["lora_unet_img_in.alpha", "lora_unet_img_in.lora_down.weight",
                                         "lora_unet_img_in.lora_up.weight"]
    assert reps["invokeai"].rejected and verify_lora.main([str(tmp_path / "in.safetensors")]) == 1
    assert verify_lora.main([str(tmp_path / "in.safetensors"), "--loaders", "comfyui,kohya"]) == 0
    ws = random_lora(shapes)
    save_file(to_diffusers(ws, alpha_keys=True), str(tmp_path / "da.safetensors"))
    reps = _verify(tmp_path / "da.safetensors")
    assert reps["diffusers"].ok and reps["comfyui"].ok and reps["invokeai"].rejected
    assert reps["kohya"].dropped and not reps["kohya"].used
    sd = {k: v for k, v in load_file(str(tmp_path / "ok.safetensors")).items() if not k.endswith("alpha")}
    save_file(sd, str(tmp_path / "noalpha.safetensors"))
    reps = _verify(tmp_path / "noalpha.safetensors")
    assert "KeyError" in reps["kohya"].rejected and reps["comfyui"].ok
    save_file(to_diffusers(ws), str(tmp_path / "dm.safetensors"), {"lora_adapter_metadata": '{"lora_alpha": 8}'})
    reps = _verify(tmp_path / "dm.safetensors")
    assert reps["diffusers"].ok and reps["comfyui"].strength and not reps["comfyui"].ok
