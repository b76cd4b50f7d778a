#!/usr/bin/env bash
# Issue 11, two device calls of < 10 minutes each, results under $OUT:
#   bash tools/bench_issue11_gpu_e.sh e   # fp8 matmul layer check; step bench: checkpoint inside the compiled
#                                         # graphs against the eager checkpoint (ekc); trainer: --fp8_matmul rows
#   bash tools/bench_issue11_gpu_e.sh f   # 50-step loss curves at 512² (plain, compiled, --fp8_matmul, seed 2)
#                                         # with sample images at step 0 and 50 from each run
#   bash tools/bench_issue11_gpu_e.sh g   # the most needed of e and f in one call (when machines are scarce)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
S="python3 tools/bench_train_step.py"
T="python3 tools/bench_trainer.py --work /tmp/bt"
case "${1:-e}" in
e)
  timeout 100 python3 tools/check_fp8_matmul_cuda.py --out "$OUT/fp8_check.json" > "$OUT/fp8_check.log" 2>&1
  echo "fp8 check rc=$?"; tail -7 "$OUT/fp8_check.log"
  timeout 200 $S --steps 8 --warmup 3 --budget-s 185 --configs compile:ckpt:512:default \
    compile:ckpt:512:default:ekc compile:ckpt:1024:default compile:ckpt:1024:default:ekc \
    --out "$OUT/step_e.json" > "$OUT/step_e.log" 2>&1
  echo "step bench rc=$?"; tail -7 "$OUT/step_e.log"
  timeout 270 $T --out "$OUT/trainer_e.json" --budget-s 250 --run-timeout 100 --runs \
    "f8mm1024=1024:13::gradient_checkpointing,torch_compile,fp8_matmul" \
    "ckpt1024=1024:13::gradient_checkpointing,torch_compile" \
    "ckpt512=512:13::gradient_checkpointing,torch_compile" \
    "f8mm512=512:13::gradient_checkpointing,torch_compile,fp8_matmul" \
    "f8mmnockpt1024=1024:13::torch_compile,fp8_matmul" \
    "fp8swap1024=1024:10::gradient_checkpointing,torch_compile,fp8_base,blocks_to_swap~18" \
    > "$OUT/trainer_e.log" 2>&1
  echo "trainer rc=$?"; tail -9 "$OUT/trainer_e.log"
  ;;
f)
  printf 'a photo of a red fox in the snow --w 512 --h 512 --s 20 --d 7\n' > /tmp/prompts.txt
  SAMPLE="sample_prompts~/tmp/prompts.txt,sample_at_first,sample_every_n_steps~50"
  timeout 420 $T --out "$OUT/trainer_f.json" --budget-s 400 --run-timeout 120 --runs \
    "lossplain512=512:50::$SAMPLE" "lossfast512=512:50::gradient_checkpointing,torch_compile,$SAMPLE" \
    "lossf8mm512=512:50::gradient_checkpointing,torch_compile,fp8_matmul,$SAMPLE" \
    "lossplain512seed2=512:50::seed~2,$SAMPLE" > "$OUT/trainer_f.log" 2>&1
  echo "trainer rc=$?"; tail -7 "$OUT/trainer_f.log"
  for d in /tmp/bt/runs/loss*/; do
    n=$(basename "$d"); mkdir -p "$OUT/samples/$n"; cp "$d"/sample/*.png "$OUT/samples/$n/" 2>/dev/null
  done
  ;;
g)
  timeout 75 python3 tools/check_fp8_matmul_cuda.py --shapes 4 --out "$OUT/fp8_check.json" > "$OUT/fp8_check.log" 2>&1
  echo "fp8 check rc=$?"; tail -7 "$OUT/fp8_check.log"
  printf 'a photo of a red fox in the snow --w 512 --h 512 --s 20 --d 7\n' > /tmp/prompts.txt
  SAMPLE="sample_prompts~/tmp/prompts.txt,sample_at_first,sample_every_n_steps~50"
  timeout 310 $T --out "$OUT/trainer_g.json" --budget-s 290 --run-timeout 100 --runs \
    "f8mm1024=1024:13::gradient_checkpointing,torch_compile,fp8_matmul" \
    "ckpt1024=1024:13::gradient_checkpointing,torch_compile" \
    "lossfast512=512:50::gradient_checkpointing,torch_compile,$SAMPLE" \
    "lossf8mm512=512:50::gradient_checkpointing,torch_compile,fp8_matmul,$SAMPLE" \
    "lossfast512seed2=512:50::gradient_checkpointing,torch_compile,seed~2,$SAMPLE" \
    > "$OUT/trainer_g.log" 2>&1
  echo "trainer rc=$?"; tail -8 "$OUT/trainer_g.log"
  for d in /tmp/bt/runs/loss*/; do
    n=$(basename "$d"); mkdir -p "$OUT/samples/$n"; cp "$d"/sample/*.png "$OUT/samples/$n/" 2>/dev/null
  done
  timeout 125 $S --steps 8 --warmup 3 --budget-s 115 --configs compile:ckpt:512:default \
    compile:ckpt:512:default:ekc --out "$OUT/step_g.json" > "$OUT/step_g.log" 2>&1
  echo "step bench rc=$?"; tail -5 "$OUT/step_g.log"
  ;;
esac
ls "$OUT"
