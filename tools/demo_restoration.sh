#!/usr/bin/env bash
# A tiny end-to-end restoration LoRA demo (FLUX.1 Kontext objective, the degraded photo as reference tokens)
# on the shipped photos and tiny seeded checkpoints; about 1-2 minutes on 2 CPU cores, nothing downloaded.
#
#   bash tools/demo_restoration.sh            # writes demo_output/restoration/
#
# 1. --dry_run: the plan (11 photos x 2 variants) and degradation_preview.png, a contact sheet of
#    (target | control) pairs, to look at before training;
# 2. training: the control images are made from the photos by the [datasets.subsets.degradation] tables of
#    dataset_configs/demo_restoration.toml, their latents cached (in memory here) like the targets', and
#    appended to the image tokens as Kontext reference tokens (first position axis 1);
# 3. the loss of the first and the last steps, from restore_lora_loss.csv.
# Extra arguments go to the trainer (e.g. --max_train_epochs 2 for a quick check).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
OUT=demo_output/restoration
MODELS=demo_output/tiny_models
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
[ -f "$MODELS/flux1-tiny-dev.safetensors" ] || "$PYTHON" tools/make_tiny_checkpoints.py --out "$MODELS"

"$PYTHON" flux_train_network.py --dataset_config dataset_configs/demo_restoration.toml --dry_run --output_dir "$OUT"

"$PYTHON" flux_train_network.py --pretrained_model_name_or_path "$MODELS/flux1-tiny-dev.safetensors" \
  --clip_l "$MODELS/clip_l.safetensors" --t5xxl "$MODELS/t5xxl_fp16.safetensors" --ae "$MODELS/ae.safetensors" \
  --dataset_config dataset_configs/demo_restoration.toml --output_dir "$OUT" --output_name restore_lora \
  --network_module networks.lora_flux --network_dim 8 --network_alpha 8 --network_train_unet_only \
  --optimizer_type AdamW --learning_rate 2e-3 --max_train_epochs 6 --seed 42 --mixed_precision no \
  --timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0 \
  --cache_latents --cache_text_encoder_outputs --t5xxl_max_token_length 32 --max_data_loader_n_workers 0 \
  --save_model_as safetensors "$@"

"$PYTHON" - "$OUT/restore_lora_loss.csv" <<'PY'
import sys
rows = [line.split(",") for line in open(sys.argv[1]).read().splitlines()[1:]]
loss = [float(r[1]) for r in rows]
k = max(1, min(10, len(loss) // 4))
print(f"restoration demo: {len(loss)} steps; mean loss of the first {k}: {sum(loss[:k]) / k:.4f}, "
      f"of the last {k}: {sum(loss[-k:]) / k:.4f}")
PY
