"""Read LoRA files with InvokeAI's own FLUX LoRA code (PyPI wheel installed without its dependencies).

Run in a subprocess by tests/test_lora_interop.py:  python invoke_check.py spec.json
spec: {"cases": [{"lora": file, "out": path stem}, ...]}. Per case writes <out>.json
({"format": detected FluxLoRAFormat name or null, "layers": [InvokeAI layer keys]}) and <out>.safetensors
("<layer key>" → the ΔW InvokeAI would add at weight 1.0, fp32).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path


def _import_invokeai():
    # diffusers/transformers must see that torchvision is absent *before* the stub exists, otherwise their
    # lazy imports believe it is there and break; InvokeAI then imports the stub.
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from transformers.utils import is_torchvision_available

    is_torchvision_available()
    sys.path.insert(0, str(Path(__file__).resolve().parent / "stubs"))
    import torchvision  # noqa: F401  (the stub)

    import invokeai.backend.model_manager.load  # noqa: F401  (avoids a circular import in formats)
    from invokeai.backend.patches.lora_conversions import flux_kohya_lora_conversion_utils as kohya
    from invokeai.backend.patches.lora_conversions.formats import flux_format_from_state_dict

    return types.SimpleNamespace(detect=flux_format_from_state_dict,
                                 from_kohya=kohya.lora_model_from_flux_kohya_state_dict)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    inv = _import_invokeai()
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for case in spec["cases"]:
        sd = load_file(case["lora"])
        with safe_open(case["lora"], "pt") as f:
            metadata = f.metadata() or {}
        fmt = inv.detect(sd, metadata)
        report = {"format": getattr(fmt, "name", None), "layers": []}
        deltas = {}
        if report["format"] == "Kohya":
            model = inv.from_kohya(sd)
            for key, layer in model.layers.items():
                zero = torch.zeros(layer.up.shape[0], layer.down.shape[1])
                deltas[key] = layer.get_parameters({"weight": zero}, 1.0)["weight"].float().contiguous()
            report["layers"] = sorted(model.layers)
        save_file(deltas, case["out"] + ".safetensors")
        Path(case["out"] + ".json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
