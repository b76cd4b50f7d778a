"""LoRA key formats: parsing every style in the wild, conversions and their exact round trips."""

from __future__ import annotations

import json

import pytest
import torch

from networks import lora_keys as K
from networks.lora_formats import LoRAWeight, fuse_parts, parse_lora, to_comfyui, to_diffusers, to_kohya
from tests.interop.helpers import random_lora

H, M = 8, 32  # tiny hidden and mlp widths
SHAPES = {
    **{f"lora_unet_double_blocks_0_{s}_{k}": v for s in ("img", "txt") for k, v in {
        "attn_qkv": (3 * H, H), "attn_proj": (H, H), "mlp_0": (M, H), "mlp_2": (H, M), "mod_lin": (6 * H, H)}.items()},
    "lora_unet_single_blocks_0_linear1": (3 * H + M, H), "lora_unet_single_blocks_0_linear2": (H, H + M),
    "lora_unet_single_blocks_0_modulation_lin": (3 * H, H),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (4, 4),
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": (4, 16),
}
OUTSIDE = {"lora_unet_final_layer_adaLN_modulation_1": (2 * H, H), "lora_unet_img_in": (H, 16),
           "lora_unet_time_in_out_layer": (H, H), "lora_unet_final_layer_linear": (16, H)}


def deltas(ws: dict[str, LoRAWeight]) -> dict[str, torch.Tensor]:
    return {n: w.delta() for n, w in ws.items()}


def assert_same_deltas(a: dict[str, LoRAWeight], b: dict[str, LoRAWeight], tol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for n in a:
        da, db = a[n].delta(), b[n].delta()
        assert da.shape == db.shape, n
        assert (da - db).abs().max() <= tol * max(1.0, float(da.abs().max())), n


def block_diag_lora(rank: int = 3, alpha: float = 3.0, seed: int = 5) -> dict[str, LoRAWeight]:
    """What a split_qkv network saves: per-part rank `rank`, fused rank n·rank, alpha × n."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, rows in (("lora_unet_double_blocks_0_img_attn_qkv", [H] * 3),
                       ("lora_unet_single_blocks_0_linear1", [H, H, H, M])):
        parts = {i: LoRAWeight(torch.randn(rank, H, generator=gen), torch.randn(r, rank, generator=gen), alpha)
                 for i, r in enumerate(rows)}
        out[name] = fuse_parts(parts, rows)
    return out


def test_name_tables_are_inverse():
    for name in list(SHAPES) + list(OUTSIDE) + ["lora_te3_encoder_block_3_layer_1_DenseReluDense_wi_0",
                                                "lora_te3_encoder_block_0_layer_0_SelfAttention_o"]:
        comp, path = K.split_kohya_name(name)
        assert K.kohya_name(comp, path) == name
    assert K.split_kohya_name("lora_unet_double_blocks_0_img_mod_lin") == ("transformer", "double_blocks.0.img_mod.lin")
    assert K.split_kohya_name("lora_unet_single_blocks_3_modulation_lin") == ("transformer", "single_blocks.3.modulation.lin")
    assert K.split_kohya_name("lora_unet_double_blocks_0_img_attn_qkvx") is None
    for path in ["double_blocks.2.txt_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"]:
        split, prefix = K.bfl_to_diffusers(path)
        for i, part in enumerate(split.parts):
            assert K.diffusers_to_bfl(prefix + part)[0] == path and K.diffusers_to_bfl(prefix + part)[2] == i


def test_kohya_parse_and_write_exact():
    ws = random_lora({**SHAPES, **OUTSIDE}, rank=4, alpha=2.0)
    sd = to_kohya(ws)
    assert all(sd[k].dtype == torch.float32 and sd[k].ndim == 0 for k in sd if k.endswith(".alpha"))
    parsed = parse_lora(sd)
    assert parsed.unknown == [] and parsed.formats == {"kohya"}
    for n, w in ws.items():
        assert torch.equal(parsed.weights[n].down, w.down) and torch.equal(parsed.weights[n].up, w.up)
        assert parsed.weights[n].alpha == 2.0


def test_missing_alpha_means_scale_one_and_is_written_as_rank():
    ws = random_lora(SHAPES, rank=4, alpha=None)
    sd = {k: v for k, v in to_kohya(ws).items() if not k.endswith(".alpha")}
    parsed = parse_lora(sd)
    w = parsed.weights["lora_unet_single_blocks_0_linear2"]
    assert w.alpha is None and w.scale == 1.0
    assert to_kohya(parsed.weights)["lora_unet_single_blocks_0_linear2.alpha"].item() == 4.0


@pytest.mark.parametrize("alpha_keys", [False, True])
def test_kohya_diffusers_round_trip(alpha_keys):
    ws = {**random_lora({**SHAPES, **OUTSIDE}, rank=4, alpha=3.0), **block_diag_lora()}
    dsd = to_diffusers(ws, alpha_keys=alpha_keys)
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in dsd)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in dsd
    assert "transformer.norm_out.linear.lora_B.weight" in dsd
    assert any(k.endswith(".alpha") for k in dsd) == alpha_keys
    # block-diagonal (split_qkv) modules split back to their per-part rank; dense ones share the down
    assert dsd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape[0] == 3
    assert dsd["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight"].shape[0] == 4
    back = parse_lora(dsd)
    assert back.unknown == [] and back.formats == {"diffusers"}
    assert_same_deltas(ws, back.weights)
    if alpha_keys:  # weights untouched: the round trip is exact tensor for tensor
        for n, w in ws.items():
            assert torch.equal(back.weights[n].down, w.down) and torch.equal(back.weights[n].up, w.up), n
            assert abs(back.weights[n].alpha - w.alpha) <= 1e-6 * w.alpha


def test_norm_out_swaps_up_rows_only():
    ws = random_lora({"lora_unet_final_layer_adaLN_modulation_1": (2 * H, H)}, rank=2, alpha=2.0)
    dsd = to_diffusers(ws, alpha_keys=True)
    up = ws["lora_unet_final_layer_adaLN_modulation_1"].up
    assert torch.equal(dsd["transformer.norm_out.linear.lora_B.weight"], torch.cat([up[H:], up[:H]]))
    assert torch.equal(dsd["transformer.norm_out.linear.lora_A.weight"],
                       ws["lora_unet_final_layer_adaLN_modulation_1"].down)


def test_comfyui_styles_round_trip():
    ws = random_lora({**SHAPES, **OUTSIDE}, rank=4, alpha=5.0)
    csd = to_comfyui(ws)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in csd
    parsed = parse_lora(csd)
    assert parsed.unknown == [] and parsed.formats == {"comfyui", "kohya"}  # te keys stay lora_te1_
    assert_same_deltas(ws, parsed.weights, 0)
    # BFL/ai-toolkit-Chroma style lora_A/lora_B under diffusion_model., and bare BFL names, no alpha
    for prefix in ("diffusion_model.", "model.diffusion_model.", ""):
        sd = {}
        for n, w in ws.items():
            comp, path = K.split_kohya_name(n)
            if comp == "transformer":
                sd[f"{prefix}{path}.lora_A.weight"], sd[f"{prefix}{path}.lora_B.weight"] = w.down, w.up
        parsed = parse_lora(sd)
        assert parsed.unknown == [] and len(parsed.weights) == len(sd) // 2
        assert all(w.scale == 1.0 for w in parsed.weights.values())


def test_peft_parts_missing_and_metadata_alpha():
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for part, rows in (("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H)):  # no proj_mlp
        sd[f"transformer.single_transformer_blocks.0.{part}.lora_A.weight"] = torch.randn(2, H, generator=gen)
        sd[f"transformer.single_transformer_blocks.0.{part}.lora_B.weight"] = torch.randn(rows, 2, generator=gen)
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 1})}
    parsed = parse_lora(sd, meta)
    w = parsed.weights["lora_unet_single_blocks_0_linear1"]
    assert w.up.shape == (3 * H + int(K.MLP_RATIO * H), 6) and w.scale == pytest.approx(0.5)
    d = w.delta()
    expect_k = 0.5 * sd["transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight"] @ \
        sd["transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight"]
    assert torch.allclose(d[H:2 * H], expect_k, atol=1e-6) and (d[3 * H:] == 0).all()


def test_xlabs():
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for proc, rows in (("qkv_lora1", 3 * H), ("proj_lora1", H), ("qkv_lora2", 3 * H), ("proj_lora2", H)):
        sd[f"double_blocks.1.processor.{proc}.down.weight"] = torch.randn(4, H, generator=gen)
        sd[f"double_blocks.1.processor.{proc}.up.weight"] = torch.randn(rows, 4, generator=gen)
    parsed = parse_lora(sd)
    assert parsed.formats == {"xlabs"} and parsed.unknown == []
    assert set(parsed.weights) == {"lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_1_img_attn_proj",
                                   "lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_double_blocks_1_txt_attn_proj"}
    w = parsed.weights["lora_unet_double_blocks_1_txt_attn_qkv"]
    assert torch.equal(w.delta(), sd["double_blocks.1.processor.qkv_lora2.up.weight"] @
                       sd["double_blocks.1.processor.qkv_lora2.down.weight"])


def test_unknown_and_incomplete_keys_are_reported():
    ws = random_lora(SHAPES, rank=2)
    sd = to_kohya(ws)
    sd["lora_unet_double_blocks_0_img_attn_qkvv.lora_down.weight"] = torch.zeros(2, H)
    sd["lora_unet_single_blocks_0_linear2.dora_scale"] = torch.ones(1, H)
    del sd["lora_unet_single_blocks_0_modulation_lin.lora_up.weight"]
    sd["transformer.some.new.layer.lora_A.weight"] = torch.zeros(2, 2)
    parsed = parse_lora(sd)
    assert set(parsed.unknown) == {
        "lora_unet_double_blocks_0_img_attn_qkvv.lora_down.weight", "lora_unet_single_blocks_0_linear2.dora_scale",
        "lora_unet_single_blocks_0_modulation_lin.lora_down.weight",
        "lora_unet_single_blocks_0_modulation_lin.alpha", "transformer.some.new.layer.lora_A.weight"}
    assert "lora_unet_single_blocks_0_modulation_lin" not in parsed.weights


def test_written_tensors_are_contiguous_and_unshared():
    ws = random_lora(SHAPES, rank=4)
    dsd = to_diffusers(ws, dtype=torch.bfloat16)  # dense split: q, k, v share one down in memory
    ptrs = [t.untyped_storage().data_ptr() for t in dsd.values()]
    assert len(set(ptrs)) == len(ptrs) and all(t.is_contiguous() for t in dsd.values())
    assert all(t.dtype == torch.bfloat16 for t in dsd.values())
    from safetensors.torch import save

    save(dsd)  # would raise "Some tensors share memory"


def test_onetrainer_flat_diffusers_names():
    ws = random_lora({**SHAPES, "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H)}, rank=4, alpha=2.0)
    dsd = to_diffusers(ws, alpha_keys=True)
    flat = {}
    for k, v in dsd.items():
        if k.startswith("transformer."):
            stem, _, suffix = k[len("transformer."):].rpartition(".lora_") if ".lora_" in k else \
                (k[len("transformer."):-len(".alpha")], "", "alpha")
            suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight", "alpha": "alpha"}[suffix]
            flat[f"lora_transformer_{stem.replace('.', '_')}.{suffix}"] = v
    parsed = parse_lora(flat)
    assert parsed.unknown == []
    assert_same_deltas({n: w for n, w in ws.items() if n.startswith("lora_unet")}, parsed.weights)
