#!/usr/bin/env bash
# One device call (< 10 min), results under $OUT: issue 8's compiled Kontext steps (a fresh process: an
# earlier process that switched from eager to compiled died with "illegal memory access"), the block-swap
# check on CUDA (gradients and pinned H2D rate), the trainer's block-swap rows with the forward+backward
# prefetch, and a profile of the 512² compiled step (checkpointing and not).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; nproc
timeout 190 python3 tools/bench_kontext_step.py --configs compile:ckpt:plain compile:ckpt:flow compile:ckpt:kontext \
  --budget-s 170 --out "$OUT/kontext_compile.json" > "$OUT/kontext_compile.log" 2>&1; echo "kontext rc=$?"
tail -3 "$OUT/kontext_compile.log"
timeout 60 python3 tools/check_block_swap_cuda.py --out "$OUT/swap_check.json" > "$OUT/swap_check.log" 2>&1
echo "swap check rc=$?"; grep -E '"ok"|h2d' "$OUT/swap_check.log" | tr -d '\n'; echo
timeout 200 python3 tools/bench_trainer.py --work /tmp/bt --out "$OUT/trainer_c.json" --budget-s 185 --run-timeout 90 \
  --runs "fp8swap1024=1024:10::gradient_checkpointing,torch_compile,fp8_base,blocks_to_swap~18" \
  "vram24=1024:10:24:max_vram_gib~24,torch_compile" "vram12=1024:10:12:max_vram_gib~12,torch_compile" \
  > "$OUT/trainer_c.log" 2>&1; echo "trainer rc=$?"
tail -5 "$OUT/trainer_c.log"
timeout 120 python3 tools/bench_train_step.py --steps 6 --warmup 3 --budget-s 100 --top-ops 12 \
  --configs compile:ckpt:512:default:prof compile:nockpt:512:default:prof --out "$OUT/step512.json" \
  > "$OUT/step512.log" 2>&1; echo "step512 rc=$?"
tail -4 "$OUT/step512.log"
ls "$OUT"
