#!/usr/bin/env bash
# GPU smoke test of flux_train_network.py on the tiny checkpoints: every memory/speed option on CUDA
# (bf16, full_bf16, fp8_base, blocks_to_swap, gradient checkpointing, torch_compile), a few steps each.
# Prints one line per variant: exit status, wall time, the final loss line.
# Usage: bash tools/gpu_smoke_train.sh OUTDIR            (one GPU, every variant)
#        bash tools/gpu_smoke_train.sh OUTDIR multi N    (N GPUs through accelerate launch, data parallel)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_smoke}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LAUNCH="$PY"
if [ "${2:-}" = multi ]; then
  LAUNCH="$PY -m accelerate.commands.launch --multi_gpu --num_processes ${3:-2} --num_machines 1 --mixed_precision bf16 --dynamo_backend no"
fi
$PY tools/make_tiny_checkpoints.py --out "$OUT/ckpt" >/dev/null || exit 1
base=(flux_train_network.py --pretrained_model_name_or_path "$OUT/ckpt/flux1-tiny-dev.safetensors"
  --clip_l "$OUT/ckpt/clip_l.safetensors" --t5xxl "$OUT/ckpt/t5xxl_fp16.safetensors" --ae "$OUT/ckpt/ae.safetensors"
  --dataset_config dataset_configs/demo_data.toml --network_module networks.lora_flux --network_dim 8
  --network_alpha 8 --network_train_unet_only --optimizer_type AdamW --learning_rate 1e-3 --max_train_steps 12
  --cache_latents --cache_text_encoder_outputs --t5xxl_max_token_length 32 --max_data_loader_n_workers 0
  --timestep_sampling shift --model_prediction_type raw --guidance_scale 1.0 --seed 1 --save_model_as safetensors)
run() {
  local name=$1; shift
  local t0=$(date +%s%N)
  $LAUNCH "${base[@]}" --output_dir "$OUT/$name" --output_name "$name" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s%N)
  local lora=missing; [ -f "$OUT/$name/$name.safetensors" ] && lora=ok
  printf '%-18s rc=%s lora=%s wall=%5d ms %s\n' "$name" "$rc" "$lora" "$(( (t1 - t0) / 1000000 ))" \
    "$(grep -aoE 'loss[=: ]+[0-9.]+' "$OUT/$name.log" | tail -1)"
  [ "$rc" = 0 ] || tail -5 "$OUT/$name.log"
}
if [ "${2:-}" = multi ]; then
  run ddp_bf16_ckpt --mixed_precision bf16 --gradient_checkpointing
  run ddp_disk_cache --mixed_precision bf16 --cache_latents_to_disk --cache_text_encoder_outputs_to_disk \
    --save_every_n_steps 6 --save_state
  exit 0
fi
run bf16            --mixed_precision bf16
run bf16_ckpt       --mixed_precision bf16 --gradient_checkpointing
run full_bf16       --mixed_precision bf16 --full_bf16
run fp8_base        --mixed_precision bf16 --fp8_base --gradient_checkpointing
run swap2           --mixed_precision bf16 --blocks_to_swap 2
run swap2_ckpt_fp8  --mixed_precision bf16 --blocks_to_swap 2 --gradient_checkpointing --fp8_base
run compile         --mixed_precision bf16 --gradient_checkpointing --torch_compile
run compile_swap    --mixed_precision bf16 --blocks_to_swap 2 --torch_compile
run cpu_offload_ckpt --mixed_precision bf16 --gradient_checkpointing --cpu_offload_checkpointing
run samples         --mixed_precision bf16 --sample_prompts dataset_configs/demo_prompts.txt --sample_every_n_steps 6
