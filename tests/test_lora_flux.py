"""The LoRA network on the tiny FLUX: injection, network_args, dropout, merge, save/load, optimizer groups."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.errors import UserError
from networks.lora_flux import apply_lora_weights, create_network, create_network_from_weights
from networks.lora_metadata import build_kohya_metadata
from networks.lora_modules import LoRAModule
from tests.interop.helpers import flux_inputs, randomize_network, tiny_clip, tiny_flux

N_UNET = 2 * 10 + 2 * 3  # tiny model: 2 double blocks × 10 Linears + 2 single blocks × 3


@pytest.fixture()
def model():
    return tiny_flux()


def run(model, inp=None):
    inp = inp or flux_inputs(model.params)
    with torch.no_grad():
        return model(**inp)


def names(network) -> set[str]:
    return {a.lora_name for a in network.adapters()}


def test_zero_init_is_identity_and_visible(model):
    ref = run(model)
    net = create_network(1.0, 4, 1, model)
    replaced = net.apply_to()
    assert len(replaced) == N_UNET and set(replaced) == names(net)
    assert isinstance(model.double_blocks[0].img_attn.qkv, LoRAModule)
    assert "LoRAAdapter" in repr(model.single_blocks[1])
    assert torch.equal(run(model), ref)  # up = 0 → exactly the base output
    randomize_network(net)
    assert (run(model) - ref).abs().max() > 1e-3  # and a non-zero LoRA changes it
    net.restore()
    assert type(model.double_blocks[0].img_attn.qkv) is torch.nn.Linear and torch.equal(run(model), ref)


def test_only_lora_params_get_gradients(model):
    clip = tiny_clip()
    net = create_network(1.0, 4, 4, model, clip, None)
    net.apply_to()
    randomize_network(net)
    out = run_grad = model(**flux_inputs(model.params))
    out.square().mean().backward()
    lora_params = {id(p) for p in net.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in lora_params)
    unet_grads = [a.lora_down.weight.grad for a in net.adapters("transformer")]
    assert all(g is not None and g.abs().sum() > 0 for g in unet_grads)
    assert run_grad.requires_grad
    # CLIP-L: 2 layers × (q, k, v, out, fc1, fc2)
    assert len(net.adapters("te1")) == 12
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj" in names(net)


@pytest.mark.parametrize("args, expect", [
    ({"train_blocks": "single"}, lambda n: n.startswith("lora_unet_single_blocks")),
    ({"train_blocks": "double"}, lambda n: n.startswith("lora_unet_double_blocks")),
    ({"train_double_block_indices": "1", "train_single_block_indices": "none"},
     lambda n: n.startswith("lora_unet_double_blocks_1_")),
    ({"train_double_block_indices": "0-1", "train_single_block_indices": "0"},
     lambda n: "single_blocks_1" not in n),
    ({"img_attn_dim": "0", "txt_mlp_dim": "0", "single_mod_dim": "0"},
     lambda n: not any(s in n for s in ("img_attn", "txt_mlp", "modulation"))),
])
def test_block_and_type_selection(model, args, expect):
    net = create_network(1.0, 4, 1, model, **args)
    all_names = names(create_network(1.0, 4, 1, model))
    assert names(net) == {n for n in all_names if expect(n)}


def test_per_type_and_regex_dims(model):
    net = create_network(1.0, 4, 1, model, img_attn_dim="8", single_dim="6", img_mod_dim="2",
                         network_reg_dims="double_blocks_1_txt_attn_qkv=3,txt_attn=5")
    ranks = {a.lora_name: a.rank for a in net.adapters()}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8
    assert ranks["lora_unet_double_blocks_0_img_mod_lin"] == 2
    assert ranks["lora_unet_double_blocks_1_txt_attn_qkv"] == 3  # first matching regex wins
    assert ranks["lora_unet_double_blocks_0_txt_attn_proj"] == 5
    assert ranks["lora_unet_single_blocks_0_linear1"] == 6 and ranks["lora_unet_single_blocks_0_linear2"] == 6
    assert ranks["lora_unet_single_blocks_0_modulation_lin"] == 4  # single_mod_dim unset → network_dim
    assert ranks["lora_unet_double_blocks_0_img_mlp_0"] == 4


def test_in_dims_targets_embedders(model):
    net = create_network(1.0, 4, 1, model, in_dims="[2,3,0,4,5]")
    extra = names(net) - names(create_network(1.0, 4, 1, model))
    assert extra == {"lora_unet_img_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer",
                     "lora_unet_guidance_in_in_layer", "lora_unet_guidance_in_out_layer", "lora_unet_txt_in"}
    assert {a.lora_name: a.rank for a in net.adapters()}["lora_unet_txt_in"] == 5


@pytest.mark.parametrize("bad", [{"split_qvk": "True"}, {"train_blocks": "both"},
                                 {"train_double_block_indices": "0,7"}, {"in_dims": "[1,2]"},
                                 {"network_reg_dims": "([=4"}, {"ggpo_sigma": "0.1"}, {"rank_dropout": "x"}])
def test_bad_network_args_are_user_errors(model, bad):
    with pytest.raises(UserError):
        create_network(1.0, 4, 1, model, **bad)


def test_dropouts_act_only_in_training(model):
    ref_net = create_network(1.0, 4, 1, model, rank_dropout="0.5", module_dropout="0.5")
    ref_net.apply_to()
    randomize_network(ref_net)
    inp = flux_inputs(model.params)
    a = ref_net.adapters()[0]
    x = torch.randn(2, 3, a.in_features)
    a.eval()
    y1, y2 = a(x), a(x)
    assert torch.equal(y1, y2)
    a.train()
    torch.manual_seed(0)
    outs = [a(x) for _ in range(20)]
    assert any(o is None for o in outs) and any(o is not None and not torch.allclose(o, y1) for o in outs)
    model.eval()
    assert torch.equal(run(model, inp), run(model, inp))


def test_neuron_dropout(model):
    net = create_network(1.0, 4, 1, model, neuron_dropout=0.5)
    randomize_network(net)
    a = net.adapters()[0]
    x = torch.randn(4, a.in_features)
    a.train()
    assert not torch.allclose(a(x), a.eval()(x))


def test_multiplier_enable_merge_unmerge(model):
    ref = run(model)
    net = create_network(1.0, 4, 2, model, split_qkv="True")
    net.apply_to()
    randomize_network(net)
    on = run(model)
    a = net.adapters()[0]
    x = torch.randn(3, a.in_features)
    full = a(x)
    net.set_multiplier(0.5)
    assert torch.allclose(a(x), full * 0.5, atol=1e-7)
    assert not torch.allclose(run(model), on, atol=1e-4)
    net.set_enabled(False)
    assert torch.equal(run(model), ref)
    net.set_enabled(True)
    net.set_multiplier(1.0)
    w0 = model.single_blocks[0].linear1.linear.weight.clone()
    net.merge()
    assert torch.allclose(run(model), on, atol=1e-5, rtol=1e-4)
    assert not torch.equal(model.single_blocks[0].linear1.linear.weight, w0)
    net.unmerge()
    assert torch.allclose(model.single_blocks[0].linear1.linear.weight, w0, atol=1e-6)
    assert torch.allclose(run(model), on, atol=1e-5, rtol=1e-4)


def test_linear_delta_is_alpha_over_rank(model):
    net = create_network(0.7, 8, 2, model)
    net.apply_to()
    randomize_network(net)
    m = model.double_blocks[0].img_mlp[0]
    x = torch.randn(3, m.in_features)
    d, u = m.lora.lora_down.weight, m.lora.lora_up.weight
    expect = x @ (m.linear.weight + 0.7 * (2 / 8) * u @ d).T + m.linear.bias
    assert torch.allclose(m(x), expect, atol=1e-5)


def test_save_load_round_trip_kohya_keys(model, tmp_path):
    clip = tiny_clip()
    net = create_network(1.0, 4, 2, model, clip, None, img_attn_dim="6")
    net.apply_to()
    randomize_network(net)
    md = build_kohya_metadata(4, 2, {"img_attn_dim": 6}, title="t", training={"learning_rate": 1e-4})
    path = tmp_path / "l.safetensors"
    net.save_weights(path, torch.bfloat16, md)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight").dtype == torch.bfloat16
    expected = {f"{n}.{s}" for n in names(net) for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected and len(keys) == 3 * (N_UNET + 12)
    assert alpha.dtype == torch.float32 and alpha.ndim == 0 and alpha.item() == 2
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_learning_rate"] == "0.0001"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and len(meta["sshs_model_hash"]) == 64
    net2 = create_network_from_weights(1.0, path, tiny_flux(), tiny_clip())
    assert names(net2) == names(net)
    by_name = {b.lora_name: b for b in net2.adapters()}
    for a in net.adapters():
        b = by_name[a.lora_name]
        assert torch.equal(b.lora_up.weight, a.lora_up.weight.bfloat16().float())  # exact at save precision
        assert torch.equal(b.lora_down.weight, a.lora_down.weight.bfloat16().float())
        assert b.rank == a.rank and float(b.alpha) == float(a.alpha)
    info = create_network(1.0, 4, 2, tiny_flux(), tiny_clip(), None, img_attn_dim="6").load_weights(path)
    assert info == {"missing": [], "unexpected": [], "unknown_keys": []}


def test_file_format_keeps_kohya_names(model, tmp_path):
    """Inside networks/ the transformer is "transformer"; the file keeps kohya's names: `lora_unet_` + the BFL
    module path for every Linear of the blocks, `lora_te1_` for CLIP-L, and kohya's optimizer group names.
    (Negative control: PREFIX_TRANSFORMER = "lora_transformer_" in networks/lora_keys.py fails this test.)"""
    block_linears = {"lora_unet_" + n.replace(".", "_") for n, m in tiny_flux().named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks.", "single_blocks."))}
    net = create_network(1.0, 4, 1, model, tiny_clip(), None)
    net.apply_to()
    net.save_weights(tmp_path / "l.safetensors", torch.float32, {})
    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        stems = {k.split(".")[0] for k in f.keys()}
    assert {s for s in stems if not s.startswith("lora_te1_")} == block_linears and len(block_linears) == N_UNET
    assert len(stems) == N_UNET + 12
    assert {g["name"] for g in net.prepare_optimizer_params(None, None, 1e-4)} == {"unet", "textencoder 1"}


def test_split_qkv_saves_full_strength(model, tmp_path):
    net = create_network(1.0, 4, 4, model, split_qkv="True")
    net.apply_to()
    randomize_network(net)
    on = run(model)
    path = tmp_path / "s.safetensors"
    net.save_weights(path, torch.float32, {})
    with safe_open(str(path), "pt") as f:
        up = f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight")
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.lora_down.weight").shape[0] == 16
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.alpha").item() == 16  # 4 × alpha, not alpha
        assert f.get_tensor("lora_unet_double_blocks_0_txt_attn_qkv.alpha").item() == 12
    h = model.params.hidden_size
    assert (up[:h, 4:] == 0).all() and (up[3 * h:, :12] == 0).all()  # block-diagonal, exact zeros
    net.restore()
    # a loader that computes alpha/rank·up@down on the fused file reproduces the trained output
    fresh = tiny_flux()
    apply_lora_weights(fresh, None, [(path, 1.0)], merge=True)
    assert torch.allclose(run(fresh), on, atol=1e-5, rtol=1e-4)
    # and the split network takes the fused file back exactly
    net2 = create_network_from_weights(1.0, path, tiny_flux(), split_qkv="True")
    assert net2.adapters()[1].split_dims is not None
    by_name = {b.lora_name: b for b in net2.adapters()}
    for a in net.adapters():
        assert torch.allclose(a.to_weight().delta(), by_name[a.lora_name].to_weight().delta(), atol=1e-7)


def test_fp8_base_is_wrapped_and_merges(model):
    from library.flux.model import Fp8Linear, apply_fp8_storage

    apply_fp8_storage(model, torch.float32)
    net = create_network(1.0, 4, 4, model)
    assert len(net.apply_to()) == N_UNET
    assert isinstance(model.double_blocks[0].img_attn.qkv.base, Fp8Linear)
    randomize_network(net)
    inp = flux_inputs(model.params)
    on = run(model, inp)
    net.merge()
    assert model.double_blocks[0].img_attn.qkv.linear.weight.dtype == torch.float8_e4m3fn
    merged = run(model, inp)
    assert ((merged - on).norm() / on.norm()) < 0.1  # fp8 rounding of W + ΔW
    w8 = model.double_blocks[0].img_attn.qkv.linear.weight.float()  # merged values
    net.unmerge()  # fp8 weights come back exactly (a copy is kept while merged)
    assert model.double_blocks[0].img_attn.qkv.linear.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(run(model, inp), on)
    assert not torch.equal(w8, model.double_blocks[0].img_attn.qkv.linear.weight.float())


def test_optimizer_groups_loraplus_and_reg_lrs(model):
    clip = tiny_clip()
    net = create_network(1.0, 4, 1, model, clip, None, loraplus_unet_lr_ratio="16",
                         network_reg_lrs="single_blocks=0.5")
    groups = net.prepare_optimizer_params([2e-5], 1e-4, 1e-3)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"reg_lr_0", "reg_lr_0 plus", "unet", "unet plus", "textencoder 1"}
    assert by["unet"]["lr"] == 1e-4 and by["unet plus"]["lr"] == 1.6e-3 and by["reg_lr_0 plus"]["lr"] == 8.0
    assert by["textencoder 1"]["lr"] == 2e-5
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.parameters())) == 2 * (N_UNET + 12)
    assert {id(p) for p in by["unet plus"]["params"]} <= {id(a.lora_up.weight) for a in net.adapters()}
    assert net.prepare_optimizer_params(0, 1e-4, 1e-3)[-1]["name"] == "unet plus"  # te lr 0 → not trained
    torch.optim.AdamW(groups)


def test_max_norm_regularization(model):
    net = create_network(1.0, 4, 4, model)
    randomize_network(net, std=1.0)
    scaled, mean, mx = net.apply_max_norm_regularization(0.5)
    assert scaled == N_UNET and mx <= 0.5 + 1e-6
    assert all(float(a.to_weight().delta().norm()) <= 0.5 + 1e-4 for a in net.adapters())


def test_apply_lora_weights_merge_equals_on_the_fly(model, tmp_path):
    clip = tiny_clip()
    paths = []
    for i, args in enumerate([{}, {"split_qkv": "True"}]):
        net = create_network(1.0, 4, 2, tiny_flux(), tiny_clip(), None, **args)
        randomize_network(net, seed=i + 3)
        paths.append((tmp_path / f"{i}.safetensors", 0.8 - 0.3 * i))
        net.save_weights(paths[-1][0], torch.float32, {})
    merged_m, merged_c = tiny_flux(), tiny_clip()
    apply_lora_weights(merged_m, merged_c, paths, merge=True)
    apply_lora_weights(model, clip, paths, merge=False)
    assert isinstance(model.double_blocks[0].img_attn.qkv.base, LoRAModule)  # two stacked LoRAs
    assert torch.allclose(run(model), run(merged_m), atol=1e-5, rtol=1e-4)
    ids = torch.tensor([[1, 5, 7, 2]])
    assert torch.allclose(clip(ids).pooler_output, merged_c(ids).pooler_output, atol=1e-5)
    assert not torch.allclose(tiny_clip()(ids).pooler_output, merged_c(ids).pooler_output, atol=1e-4)


def test_t5_only_with_train_t5xxl(model, tmp_path):
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=50,
                                 feed_forward_proj="gated-gelu")).eval().requires_grad_(False)
    assert not any(n.startswith("lora_te3_") for n in names(create_network(1.0, 4, 1, model, None, t5)))
    net = create_network(1.0, 4, 1, model, None, t5, train_t5xxl="True")
    te3 = {n for n in names(net) if n.startswith("lora_te3_")}
    assert len(te3) == 2 * 7 and "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in te3
    groups = {g["name"]: g["lr"] for g in net.prepare_optimizer_params([1e-5, 3e-5], 1e-4, 1e-3)}
    assert groups == {"unet": 1e-4, "textencoder 2": 3e-5}
    net.save_weights(tmp_path / "t5.safetensors", torch.float32, {})
    assert names(create_network_from_weights(1.0, tmp_path / "t5.safetensors", tiny_flux(), None, t5)) == names(net)


def test_apply_to_only_unet_drops_text_encoder_modules(model):
    net = create_network(1.0, 4, 1, model, tiny_clip(), None)
    replaced = net.apply_to(text_encoder=False)
    assert len(replaced) == N_UNET and not net.adapters("te1")
    assert len(list(net.parameters())) == 2 * N_UNET


def test_network_dtype_cast_keeps_alpha_exact(model, tmp_path):
    net = create_network(1.0, 10, 3, model)  # scale 0.3: not representable in bf16
    net.apply_to()
    randomize_network(net)
    net.to(dtype=torch.bfloat16)
    net.save_weights(tmp_path / "a.safetensors", torch.bfloat16, {})
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_single_blocks_0_linear2.alpha").item() == 3.0
    assert net.adapters()[0].scale == pytest.approx(0.3, rel=1e-12)


def test_flux1_dev_sizes_on_meta():
    """kohya's module count and shapes on the real FLUX.1-dev / CLIP-L architecture (meta device: no memory)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.flux.model import Flux, FluxParams

    with torch.device("meta"):
        dev = Flux(FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                              mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, qkv_bias=True,
                              guidance_embed=True))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12))
    net = create_network(1.0, 16, 16, dev, clip, None)
    assert len(net.adapters("transformer")) == 304 and len(net.adapters("te1")) == 72
    w = {a.lora_name: (tuple(a.lora_down.weight.shape), tuple(a.lora_up.weight.shape)) for a in net.adapters()}
    assert w["lora_unet_single_blocks_37_linear1"] == ((16, 3072), (21504, 16))
    assert w["lora_unet_single_blocks_0_linear2"] == ((16, 15360), (3072, 16))
    assert w["lora_unet_double_blocks_18_img_mod_lin"] == ((16, 3072), (18432, 16))
    assert w["lora_unet_double_blocks_0_txt_attn_qkv"] == ((16, 3072), (9216, 16))
    n_params = sum(p.numel() for a in net.adapters("transformer") for p in a.parameters())
    assert n_params == 4_786_176 * 16  # kohya: 4,786,176 parameters per unit of rank
