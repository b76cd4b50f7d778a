"""LoRA files saved by the project (plain + CLIP-L, split_qkv, per-layer ranks) and the deltas they mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from networks.lora_flux import create_network
from tests.interop.helpers import randomize_network, tiny_clip, tiny_flux

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "plain": dict(network_dim=4, network_alpha=2.0, args={}),
    "split_qkv": dict(network_dim=4, network_alpha=4.0, args={"split_qkv": "True"}),
    "per_layer": dict(network_dim=4, network_alpha=2.0,
                      args={"img_attn_dim": "8", "single_dim": "2", "network_reg_dims": "txt_mlp=3"}),
}


@dataclass
class LoRACase:
    name: str
    file: Path
    unet: dict[str, torch.Tensor]  # BFL weight key → expected ΔW (fp32)
    te: dict[str, torch.Tensor]  # CLIP-L weight key (text_model.…weight) → expected ΔW


@dataclass
class InteropSetup:
    transformer_file: Path
    params: object
    clip_shapes: dict[str, list[int]]  # "text_model.encoder…weight" → shape
    cases: dict[str, LoRACase]
    kohya_bug_file: Path  # negative control: the split_qkv file with kohya's unscaled alpha (sd-scripts#2204)
    diffusers_file: Path  # written by diffusers' save_lora_weights
    diffusers_fused: dict[str, torch.Tensor]  # ΔW diffusers applies for it (diffusers keys)


def build_setup(tmp: Path) -> InteropSetup:
    model, clip = tiny_flux(), tiny_clip()
    tf = tmp / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tf))
    clip_shapes = {("" if k.startswith("text_model.") else "text_model.") + k: list(v.shape)
                   for k, v in clip.state_dict().items()}
    cases = {}
    for i, (name, v) in enumerate(VARIANTS.items()):
        net = create_network(1.0, v["network_dim"], v["network_alpha"], model, clip, None, **v["args"])
        randomize_network(net, seed=10 + i)
        path = tmp / f"{name}.safetensors"
        net.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_flux"})
        unet, te = {}, {}
        for a in net.adapters():
            t = net._targets[a.lora_name]
            d = a.to_weight().delta() if not a.split_dims else _split_delta(a)
            if t.component == "transformer":
                unet[t.path + ".weight"] = d
            else:
                te[("" if t.path.startswith("text_model.") else "text_model.") + t.path + ".weight"] = d
        cases[name] = LoRACase(name, path, unet, te)
    bug = load_file(str(cases["split_qkv"].file))
    for k in bug:
        if k.endswith(("qkv.alpha", "linear1.alpha")):
            bug[k] = torch.tensor(VARIANTS["split_qkv"]["network_alpha"])
    save_file(bug, str(tmp / "kohya_bug.safetensors"))
    dfile, dfused = diffusers_written_lora(tmp, model.params)
    return InteropSetup(tf, model.params, clip_shapes, cases, tmp / "kohya_bug.safetensors", dfile, dfused)


def _split_delta(a) -> torch.Tensor:
    """ΔW of a split_qkv module from its *trained* parts (not from the fused file): what training learned."""
    rows = [(u.weight.float() @ d.weight.float()) * a.scale for d, u in zip(a.lora_down, a.lora_up)]
    return torch.cat(rows, dim=0)


def comfy_unet_config(p) -> dict:
    return {"image_model": "flux", "guidance_embed": p.guidance_embed, "in_channels": p.in_channels // 4,
            "out_channels": p.out_channels // 4, "vec_in_dim": p.vec_in_dim, "context_in_dim": p.context_in_dim,
            "hidden_size": p.hidden_size, "mlp_ratio": p.mlp_ratio, "num_heads": p.num_heads, "depth": p.depth,
            "depth_single_blocks": p.depth_single_blocks, "axes_dim": [16, 56, 56], "theta": 10000,
            "patch_size": 2, "qkv_bias": p.qkv_bias}


def run_helper(script: str, spec: dict, tmp: Path, timeout: int = 300) -> None:
    """Run tests/interop/<script> on a JSON spec in a fresh interpreter (offline, no GPU)."""
    spec_file = tmp / f"{script}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(HERE.parents[1])}
    res = subprocess.run([sys.executable, str(HERE / script), str(spec_file)], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=str(tmp))
    if res.returncode != 0:
        raise AssertionError(f"{script} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")


def diffusers_written_lora(tmp: Path, p) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA written by diffusers itself (PEFT adapter, `save_lora_weights`, lora_alpha ≠ r in the metadata),
    and the ΔW diffusers applies when fusing it (diffusers weight key → ΔW)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=p.in_channels, num_layers=p.depth,
                                num_single_layers=p.depth_single_blocks, attention_head_dim=128,
                                num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                                pooled_projection_dim=p.vec_in_dim, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "proj_mlp", "ff.net.2", "norm1.linear", "norm.linear", "norm_out.linear"]
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    path = tmp / "diffusers_written.safetensors"
    FluxPipeline.save_lora_weights(str(tmp), transformer_lora_layers=get_peft_model_state_dict(tr),
                                   transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 8},
                                   weight_name=path.name)
    before = {k: v.clone() for k, v in tr.state_dict().items() if "lora_" not in k}
    tr.fuse_lora(lora_scale=1.0)
    after = tr.state_dict()
    deltas = {}
    for k, v in after.items():  # keys keep PEFT's ".base_layer" after fusing
        if k in before and not torch.equal(v, before[k]):
            deltas[k.replace(".base_layer", "")] = v.float() - before[k].float()
    return path, deltas
