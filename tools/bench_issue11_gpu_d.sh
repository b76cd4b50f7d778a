#!/usr/bin/env bash
# One device call (~3.5 min), results under $OUT: block swap after its two fixes (prefetch in backward too; the
# swapped weights never on the device at setup): the CUDA gradient check, then the trainer's fp8 + swap row.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 45 python3 tools/check_block_swap_cuda.py --out "$OUT/swap_check.json" > "$OUT/swap_check.log" 2>&1
echo "swap check rc=$?"; grep -E '"ok"|h2d' "$OUT/swap_check.log" | tr -d '\n'; echo
timeout 180 python3 tools/bench_trainer.py --work /tmp/bt --out "$OUT/trainer_d.json" --budget-s 165 --run-timeout 110 \
  --runs "fp8swap1024=1024:10::gradient_checkpointing,torch_compile,fp8_base,blocks_to_swap~18" \
  > "$OUT/trainer_d.log" 2>&1; echo "trainer rc=$?"
tail -6 "$OUT/trainer_d.log"
