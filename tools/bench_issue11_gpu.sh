#!/usr/bin/env bash
# Issue 11's device benchmarks in two parts of < 10 minutes each (one device call each), results under $OUT:
#   bash tools/bench_issue11_gpu.sh a   # step bench (compiled 1024²/512², no-ckpt) + trainer goals runs
#   bash tools/bench_issue11_gpu.sh b   # trainer loss curves (50 steps, fast vs plain, two seeds) + cost curves
# Then, on the CPU: python tools/plot_benchmarks.py --curves curves.json --trainer trainer_b.json --out docs/img
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
S="python3 tools/bench_train_step.py"
T="python3 tools/bench_trainer.py --work /tmp/bt"
case "${1:-a}" in
a)
  timeout 170 $S --configs compile:ckpt:1024:default compile:ckpt:512:default compile:nockpt:1024:default \
    compile:ck20:1024:default --out "$OUT/step_compile.json" > "$OUT/step_compile.log" 2>&1
  tail -7 "$OUT/step_compile.log"
  timeout 400 $T --out "$OUT/trainer_a.json" --budget-s 370 --run-timeout 100 --runs \
    "ckpt1024=1024:13::gradient_checkpointing,torch_compile" \
    "ckpt1024again=1024:13::gradient_checkpointing,torch_compile" \
    "ckpt512=512:13::gradient_checkpointing,torch_compile" \
    "vram24=1024:13:24:max_vram_gib~24,torch_compile" "vram16=1024:13:16:max_vram_gib~16,torch_compile" \
    "vram12=1024:13:12:max_vram_gib~12,torch_compile" "vram80=1024:13:80:max_vram_gib~80,torch_compile" \
    "fp8ckpt1024=1024:13::gradient_checkpointing,torch_compile,fp8_base" \
    "fp8swap1024=1024:10::gradient_checkpointing,torch_compile,fp8_base,blocks_to_swap~18" \
    > "$OUT/trainer_a.log" 2>&1
  tail -12 "$OUT/trainer_a.log"
  ;;
b)
  timeout 330 $T --out "$OUT/trainer_b.json" --budget-s 300 --run-timeout 110 --runs \
    "lossplain512=512:50::" "lossfast512=512:50::gradient_checkpointing,torch_compile" \
    "lossplain512seed2=512:50::seed~2" > "$OUT/trainer_b.log" 2>&1
  tail -6 "$OUT/trainer_b.log"
  timeout 200 $S --steps 3 --warmup 1 --budget-s 180 --configs eager:ckpt:512:default eager:ckpt:768:default \
    eager:ckpt:1024:default eager:ckpt:1536:default eager:ckpt:1024:default:r4 eager:ckpt:1024:default:r64 \
    eager:ckpt:1024:default:r256 eager:ckpt:1024:default:b2 eager:ckpt:1024:default:b4 \
    --out "$OUT/curves.json" > "$OUT/curves.log" 2>&1
  tail -12 "$OUT/curves.log"
  ;;
esac
ls "$OUT"
