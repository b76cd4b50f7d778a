#!/usr/bin/env bash
# sha256 of a 30-step tiny run's outputs (LoRA, resume state folder, loss CSV): run before and after a
# refactor that must not change behaviour, and compare the two lists.
#
#     bash tools/refactor_hashes.sh [WORK_DIR]      (default /tmp/refactor_hashes; prints "sha256  file")
#
# Tiny seeded checkpoints and 64 px copies of the repo's sample images, so it runs on a CPU in ~a minute.
# The paths are fixed (WORK_DIR), so the run's inputs are byte-identical from one call to the next.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-/tmp/refactor_hashes}
rm -rf "$WORK"
mkdir -p "$WORK"
$PY tools/make_tiny_checkpoints.py --out "$WORK/ckpt" >/dev/null
$PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
work = Path(sys.argv[1]); src = Path("dataset_configs/data")
for sub, folder, names in (("dog", "dreambooth_dog", ["00.jpg", "01.jpg"]),
                           ("captioned", "clip_skimage_captioned", ["chelsea.png", "coffee.png"])):
    (work / sub).mkdir()
    for name in names:
        with Image.open(src / folder / name) as im:
            im.convert("RGB").resize((64, 64 * im.height // im.width)).save(work / sub / name)
        cap = (src / folder / name).with_suffix(".txt")
        if cap.exists():
            (work / sub / cap.name).write_text(cap.read_text())
(work / "data.toml").write_text(
    '[general]\ncaption_extension = ".txt"\nshuffle_caption = true\n[[datasets]]\nresolution = 32\n'
    f'batch_size = 2\n[[datasets.subsets]]\nimage_dir = "{work / "dog"}"\nclass_tokens = "sks dog"\n'
    f'num_repeats = 2\n[[datasets.subsets]]\nimage_dir = "{work / "captioned"}"\n')
PYEOF
$PY flux_train_network.py --pretrained_model_name_or_path "$WORK/ckpt/flux1-tiny-dev.safetensors" \
  --clip_l "$WORK/ckpt/clip_l.safetensors" --t5xxl "$WORK/ckpt/t5xxl_fp16.safetensors" --ae "$WORK/ckpt/ae.safetensors" \
  --dataset_config "$WORK/data.toml" --output_dir "$WORK/out" --output_name lora \
  --network_module networks.lora_flux --network_dim 4 --network_alpha 4 --network_train_unet_only \
  --optimizer_type AdamW --learning_rate 2e-3 --lr_scheduler cosine --lr_warmup_steps 3 --seed 3 \
  --model_prediction_type raw --timestep_sampling shift --cache_latents --cache_text_encoder_outputs \
  --t5xxl_max_token_length 16 --max_data_loader_n_workers 0 --max_train_steps 30 --gradient_accumulation_steps 2 \
  --save_every_n_steps 10 --save_state --max_grad_norm 1.0 >"$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log"; exit 1; }
# Whole files where a file is reproducible; the LoRAs without modelspec.date (the wall clock), rng.pt
# without Python's and numpy's global states (never seeded by the trainer, so they differ run to run), and
# the wall-clock step times left out of the loss CSV (step_time_s) and of train_state.json (record.times;
# lora.sha256, the whole LoRA file's hash, date included).
(cd "$WORK/out" && find . -type f -name '*.pt' ! -name 'rng.pt' | sort | xargs sha256sum)
$PY - "$WORK/out" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
import torch
from safetensors import safe_open
out = Path(sys.argv[1])
for p in sorted(out.rglob("*.safetensors")):
    h, t = hashlib.sha256(), hashlib.sha256()
    with safe_open(str(p), "pt") as f:
        md = {k: v for k, v in (f.metadata() or {}).items() if k != "modelspec.date"}
        h.update(json.dumps(md, sort_keys=True).encode())
        for k in sorted(f.keys()):
            t.update(k.encode() + f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(t.digest())
    print(f"{h.hexdigest()}  ./{p.relative_to(out)} (tensors + metadata without modelspec.date)")
    print(f"{t.hexdigest()}  ./{p.relative_to(out)} (tensors only)")
for p in sorted(out.rglob("train_state.json")):
    state = json.loads(p.read_text())
    state.get("record", {}).pop("times", None)
    state.get("lora", {}).pop("sha256", None)  # of the whole LoRA file, modelspec.date included
    h = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    print(f"{h.hexdigest()}  ./{p.relative_to(out)} (without record.times, lora.sha256)")
for p in sorted(out.rglob("*.csv")):
    rows = [line.split(",") for line in p.read_text().splitlines()]
    drop = rows[0].index("step_time_s") if rows and "step_time_s" in rows[0] else None
    kept = "\n".join(",".join(c for i, c in enumerate(r) if i != drop) for r in rows)
    print(f"{hashlib.sha256(kept.encode()).hexdigest()}  ./{p.relative_to(out)} (without step_time_s)")
for p in sorted(out.rglob("rng.pt")):
    states = torch.load(p, weights_only=False)
    h = hashlib.sha256(b"".join(s["torch"].numpy().tobytes() for s in states))
    print(f"{h.hexdigest()}  ./{p.relative_to(out)} (torch generator states)")
PYEOF
