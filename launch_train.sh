#!/usr/bin/env bash
# Train a FLUX.1 LoRA. Every setting below comes from an environment variable with a default; set the
# model paths to train on real FLUX.1 weights:
#
#   FLUX_MODEL=models/flux1-dev.safetensors CLIP_L=models/clip_l.safetensors \
#   T5XXL=models/t5xxl_fp16.safetensors AE=models/ae.safetensors \
#   DATASET_CONFIG=my_data.toml OUTPUT_DIR=output bash launch_train.sh
#
# With no FLUX_MODEL set it runs the built-in demo instead: tiny seeded checkpoints in the real file
# layouts (written once by tools/make_tiny_checkpoints.py) trained on the small real dataset in
# dataset_configs/, under a minute on 2 CPU cores. It writes a LoRA, sample images and a loss plot
# under demo_output/. Any other kohya flag can be appended through EXTRA_ARGS or as arguments.
set -euo pipefail
cd "$(dirname "$0")"

# --- models (BFL / ComfyUI single files or a diffusers FLUX.1 folder) -----------------------------------
FLUX_MODEL="${FLUX_MODEL:-}"          # flux1-dev.safetensors (the transformer); empty = demo
CLIP_L="${CLIP_L:-}"                  # clip_l.safetensors
T5XXL="${T5XXL:-}"                    # t5xxl_fp16.safetensors
AE="${AE:-}"                          # ae.safetensors

# --- data and output --------------------------------------------------------------------------------------
DATASET_CONFIG="${DATASET_CONFIG:-dataset_configs/demo_data.toml}"  # kohya dataset TOML
OUTPUT_DIR="${OUTPUT_DIR:-output}"    # LoRA, states, samples, loss plot, effective config
OUTPUT_NAME="${OUTPUT_NAME:-flux_lora}"
SAMPLE_PROMPTS="${SAMPLE_PROMPTS:-}"  # .txt/.toml/.json with kohya's --w --h --d --s --g options
SAMPLE_EVERY_N_EPOCHS="${SAMPLE_EVERY_N_EPOCHS:-1}"

# --- LoRA and optimization -------------------------------------------------------------------------------
NETWORK_DIM="${NETWORK_DIM:-16}"      # LoRA rank
NETWORK_ALPHA="${NETWORK_ALPHA:-16}"  # scale = alpha / rank
OPTIMIZER="${OPTIMIZER:-AdamW8bit}"   # AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, Prodigy, Adafactor
LEARNING_RATE="${LEARNING_RATE:-1e-4}"
LR_SCHEDULER="${LR_SCHEDULER:-constant_with_warmup}"
LR_WARMUP_STEPS="${LR_WARMUP_STEPS:-0}"
MAX_TRAIN_EPOCHS="${MAX_TRAIN_EPOCHS:-16}"
SAVE_EVERY_N_EPOCHS="${SAVE_EVERY_N_EPOCHS:-4}"
SEED="${SEED:-42}"

# --- objective and memory --------------------------------------------------------------------------------
TIMESTEP_SAMPLING="${TIMESTEP_SAMPLING:-shift}"  # sigma, uniform, sigmoid, shift, flux_shift
DISCRETE_FLOW_SHIFT="${DISCRETE_FLOW_SHIFT:-3.1582}"
GUIDANCE_SCALE="${GUIDANCE_SCALE:-1.0}"          # 1.0 is recommended for FLUX.1-dev LoRAs
MIXED_PRECISION="${MIXED_PRECISION:-bf16}"       # bf16 on GPUs; the demo uses no (fp32 on CPU)
MEMORY_ARGS="${MEMORY_ARGS:---fp8_base --gradient_checkpointing}"  # e.g. add --blocks_to_swap 18 on 12 GB
NUM_PROCESSES="${NUM_PROCESSES:-1}"              # GPUs (data parallel)
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# The launcher: `accelerate launch` through library/train/launch.py (the same arguments; a SIGTERM, e.g. docker
# stop, ends it with one line and exit 128+signal after the state is saved, instead of a traceback).
# ACCELERATE=/path/to/accelerate uses that `accelerate launch` directly.
if [ -n "${ACCELERATE:-}" ]; then LAUNCH=("$ACCELERATE" launch); else LAUNCH=("$PYTHON" -m library.train.launch); fi
EXTRA_ARGS="${EXTRA_ARGS:-}"
CACHE_ARGS="${CACHE_ARGS:---cache_latents_to_disk --cache_text_encoder_outputs_to_disk}"  # files beside the images

if [ -z "$FLUX_MODEL" ]; then
  # The demo: tiny models, 64 px images, fp32 on the CPU, sample images and a LoRA every 8 epochs.
  MODELS=demo_output/tiny_models
  [ -f "$MODELS/flux1-tiny-dev.safetensors" ] || "$PYTHON" tools/make_tiny_checkpoints.py --out "$MODELS"
  FLUX_MODEL="$MODELS/flux1-tiny-dev.safetensors" CLIP_L="$MODELS/clip_l.safetensors"
  T5XXL="$MODELS/t5xxl_fp16.safetensors" AE="$MODELS/ae.safetensors"
  OUTPUT_DIR=demo_output OUTPUT_NAME=demo_lora SAMPLE_PROMPTS="${SAMPLE_PROMPTS:-dataset_configs/demo_prompts.txt}"
  MIXED_PRECISION=no MEMORY_ARGS="" OPTIMIZER=AdamW LEARNING_RATE=1e-3 NETWORK_DIM=8 NETWORK_ALPHA=8
  CACHE_ARGS="--cache_latents --cache_text_encoder_outputs"  # in memory: nothing written into the repo
  MAX_TRAIN_EPOCHS="${DEMO_EPOCHS:-32}" SAVE_EVERY_N_EPOCHS=8 SAMPLE_EVERY_N_EPOCHS=8
  EXTRA_ARGS="--max_data_loader_n_workers 0 --t5xxl_max_token_length 32 $EXTRA_ARGS"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
fi
PARALLEL=()  # several processes: data parallel (NCCL on GPUs, gloo on a machine without GPUs)
[ "$NUM_PROCESSES" -gt 1 ] && PARALLEL=(--multi_gpu)
SAMPLE_ARGS=()
[ -n "$SAMPLE_PROMPTS" ] &&
  SAMPLE_ARGS=(--sample_prompts "$SAMPLE_PROMPTS" --sample_every_n_epochs "$SAMPLE_EVERY_N_EPOCHS")

# shellcheck disable=SC2086  # MEMORY_ARGS, CACHE_ARGS and EXTRA_ARGS are word lists on purpose
"${LAUNCH[@]}" ${PARALLEL[@]+"${PARALLEL[@]}"} --num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision "$MIXED_PRECISION" --dynamo_backend no flux_train_network.py --pretrained_model_name_or_path "$FLUX_MODEL" --clip_l "$CLIP_L" --t5xxl "$T5XXL" --ae "$AE" --dataset_config "$DATASET_CONFIG" --output_dir "$OUTPUT_DIR" --output_name "$OUTPUT_NAME" --network_module networks.lora_flux --network_dim "$NETWORK_DIM" --network_alpha "$NETWORK_ALPHA" --network_train_unet_only --optimizer_type "$OPTIMIZER" --learning_rate "$LEARNING_RATE" --lr_scheduler "$LR_SCHEDULER" --lr_warmup_steps "$LR_WARMUP_STEPS" --max_train_epochs "$MAX_TRAIN_EPOCHS" --save_every_n_epochs "$SAVE_EVERY_N_EPOCHS" --seed "$SEED" --mixed_precision "$MIXED_PRECISION" --timestep_sampling "$TIMESTEP_SAMPLING" --discrete_flow_shift "$DISCRETE_FLOW_SHIFT" --model_prediction_type raw --guidance_scale "$GUIDANCE_SCALE" $CACHE_ARGS --save_model_as safetensors --save_state_on_train_end ${SAMPLE_ARGS[@]+"${SAMPLE_ARGS[@]}"} $MEMORY_ARGS $EXTRA_ARGS "$@"
