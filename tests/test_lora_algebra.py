"""LoRA algebra (networks/lora_algebra.py, flux_merge_lora's combine mode) and verify_lora's norms."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from networks import flux_merge_lora, lora_algebra as A, verify_lora
from networks.lora_flux import save_lora
from networks.lora_formats import LoRAWeight, read_lora
from tests.interop.helpers import random_lora

SHAPES = {"lora_unet_double_blocks_0_img_mlp_0": (32, 8), "lora_unet_single_blocks_0_linear2": (8, 40),
          "lora_unet_double_blocks_1_txt_attn_qkv": (24, 8)}


@pytest.fixture()
def pair(tmp_path):
    a = random_lora(SHAPES, 3, 1.5, seed=1)
    b = random_lora({k: v for k, v in SHAPES.items() if "txt_attn" not in k}, 2, None, seed=2)  # b lacks one module
    save_lora(a, tmp_path / "a.safetensors", torch.float32, {})
    save_lora(b, tmp_path / "b.safetensors", torch.float32, {})
    return tmp_path, a, b


def _delta(ws: dict[str, LoRAWeight], name: str) -> torch.Tensor:
    return ws[name].delta() if name in ws else torch.zeros(SHAPES[name])


@pytest.mark.parametrize("ratios", [("1", "-1"), ("0.5", "0.5"), ("2", "-0.25")])
def test_weighted_sum_and_difference_equal_the_arithmetic_on_the_deltas(pair, ratios):
    tmp, a, b = pair
    ca, cb = map(float, ratios)
    out = tmp / "c.safetensors"
    flux_merge_lora.main(["--models", str(tmp / "a.safetensors"), str(tmp / "b.safetensors"), "--ratios", *ratios,
                          "--save_to", str(out)])
    got = read_lora(out).weights
    assert set(got) == set(SHAPES)
    for n in SHAPES:
        want = ca * _delta(a, n) + cb * _delta(b, n)
        assert torch.allclose(got[n].delta(), want, atol=1e-6), n
        # negative control: the sign of b matters (a - b is not a + b) wherever b has the module
        if n in b and cb != 0:
            assert not torch.allclose(got[n].delta(), ca * _delta(a, n) - cb * _delta(b, n), atol=1e-4)


def test_difference_of_a_lora_with_itself_is_zero_and_average_of_itself_is_itself(pair):
    tmp, a, _ = pair
    terms = A.read_terms([(tmp / "a.safetensors", 1.0), (tmp / "a.safetensors", -1.0)])
    zero = A.concat(terms)
    assert all(A.effective_norm(w) < 1e-5 for w in zero.weights.values())
    avg = A.concat(A.read_terms([(tmp / "a.safetensors", 0.5), (tmp / "a.safetensors", 0.5)]))
    for n, w in avg.weights.items():
        assert w.rank == 2 * a[n].rank
        assert torch.allclose(w.delta(), a[n].delta(), atol=1e-6)


def test_svd_retains_the_reported_energy(pair, tmp_path):
    tmp, a, b = pair
    report = tmp_path / "energy.json"
    out = tmp_path / "svd.safetensors"
    flux_merge_lora.main(["--models", str(tmp / "a.safetensors"), str(tmp / "b.safetensors"), "--ratios", "1", "-1",
                          "--new_rank", "2", "--save_to", str(out), "--energy_report", str(report)])
    energy = json.loads(report.read_text())["energy"]
    got = read_lora(out).weights
    assert set(energy) == set(SHAPES)
    for n in SHAPES:
        full = _delta(a, n) - _delta(b, n)
        approx = got[n].delta()
        assert got[n].rank == 2
        measured = float((approx.double() ** 2).sum() / (full.double() ** 2).sum())
        assert measured == pytest.approx(energy[n], rel=1e-4), n
        # Eckart–Young: the residual holds exactly the energy not retained
        resid = float(((full - approx).double() ** 2).sum() / (full.double() ** 2).sum())
        assert resid == pytest.approx(1 - energy[n], abs=1e-4), n
    assert min(energy.values()) < 0.999  # rank 2 of a rank-5 difference loses something (else the test proves nothing)
    # a rank large enough retains everything and reproduces the exact combination
    full = A.svd(A.read_terms([(tmp / "a.safetensors", 1.0), (tmp / "b.safetensors", -1.0)]), 5)
    assert all(e == pytest.approx(1.0, abs=1e-6) for e in full.energy.values())
    for n in SHAPES:
        assert torch.allclose(full.weights[n].delta(), _delta(a, n) - _delta(b, n), atol=1e-5)


def test_effective_norm_is_the_frobenius_norm_of_the_update():
    for n, w in random_lora(SHAPES, 4, 2.0, seed=5).items():
        assert A.effective_norm(w) == pytest.approx(float(torch.linalg.norm(w.delta())), rel=1e-5), n


def test_combine_refuses_mismatched_shapes_and_non_finite_ratios(tmp_path):
    save_lora(random_lora({"lora_unet_single_blocks_0_linear2": (8, 40)}), tmp_path / "x.safetensors",
              torch.float32, {})
    save_lora(random_lora({"lora_unet_single_blocks_0_linear2": (8, 48)}), tmp_path / "y.safetensors",
              torch.float32, {})
    with pytest.raises(UserError, match="lora_unet_single_blocks_0_linear2: the LoRAs disagree"):
        A.concat(A.read_terms([(tmp_path / "x.safetensors", 1.0), (tmp_path / "y.safetensors", 1.0)]))
    with pytest.raises(UserError, match="x.safetensors: --ratios nan"):
        A.read_terms([(tmp_path / "x.safetensors", float("nan"))])


def test_verify_reports_norms_and_flags_non_finite(pair, capsys):
    tmp, a, _ = pair
    assert verify_lora.main([str(tmp / "a.safetensors"), "--norms", "--loaders", "comfyui"]) == 0
    text = capsys.readouterr().out
    printed = {ln.split(": ")[1]: float(ln.split(": ")[2]) for ln in text.splitlines() if "norm: lora_" in ln}
    assert set(printed) == set(a)
    for n, w in a.items():
        assert printed[n] == pytest.approx(float(torch.linalg.norm(w.delta())), rel=1e-5), n
    assert "effective norm" in text and "NON-FINITE" not in text
    sd = load_file(str(tmp / "a.safetensors"))
    sd["lora_unet_single_blocks_0_linear2.lora_up.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp / "nan.safetensors"))
    assert verify_lora.main([str(tmp / "nan.safetensors"), "--loaders", "comfyui", "--json"]) == 1
    dump = json.loads(capsys.readouterr().out)[str(tmp / "nan.safetensors")]
    assert dump["non_finite"] == ["lora_unet_single_blocks_0_linear2"]
    assert dump["norms"]["lora_unet_single_blocks_0_linear2"] is None
