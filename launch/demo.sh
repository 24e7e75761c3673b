#!/usr/bin/env bash
# The main job in miniature, on CPU: SFT, then GRPO, on a tiny random-init Llama that learns
# two-digit addition ("47+38=" -> "85"; configs/sft_rl_cpu.yaml). Prints the held-out accuracy
# (greedy pass@1 on 200 prompts no phase trains on) after SFT and after RL, the reward gain and
# the PNG of the run.
#   1. SFT  (megatron-rl lm-train --data sft, world 4: megatron-core TP2 x PP2): loss on the answer
#           only, saved as a Megatron checkpoint, exported to HF by megatron-rl convert megatron-to-hf
#   2. GRPO (megatron-rl train, world 4: megatron-core TP2 x PP2, vLLM TP1 x 4 replicas) from
#           that HF export (model.hf_path), exact-match reward, held-out eval every 10 steps
#   bash launch/demo.sh                         # SFT then RL, a fresh run in runs/demo
#   bash launch/demo.sh train.steps=40          # any override of the RL job's config
#   bash launch/demo.sh --quick                 # the quick digits task only (configs/tiny_cpu.yaml, GRPO)
#   bash launch/demo.sh --moe                   # the digits task on the tiny Qwen3-MoE (configs/tiny_moe_cpu.yaml:
#                                               # training TP2 x EP2, vLLM TP1 x 4), GRPO
#   SFT_STEPS=300 bash launch/demo.sh           # a shorter SFT phase (lower SFT accuracy)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=${RUN:-runs/demo}
FAMILY=llama
if [ "${1:-}" = "--moe" ]; then FAMILY=qwen3_moe; MODEL=${MODEL:-runs/tiny-moe}; fi
MODEL=${MODEL:-runs/tiny-llama}
SFT_STEPS=${SFT_STEPS:-500}      # 64 examples each
SFT_LR=${SFT_LR:-1e-3}

if [ ! -f "$MODEL/config.json" ]; then
  python tools/make_tiny_model.py --family "$FAMILY" --out "$MODEL"
fi
rm -rf "$RUN"   # a fresh run each time (a kept run directory would resume from its checkpoint)
if [ "${1:-}" = "--quick" ] || [ "${1:-}" = "--moe" ]; then
  [ "$1" = "--moe" ] && CONFIG=${CONFIG:-configs/tiny_moe_cpu.yaml}
  shift
  CONFIG=${CONFIG:-configs/tiny_cpu.yaml} SKIP_ENV=1 bash launch/torchrun.sh \
    model.hf_path="$MODEL" logging.run_dir="$RUN" checkpoint.dir="$RUN/ckpt" "$@"
  exit 0
fi
CONFIG=${CONFIG:-configs/sft_rl_cpu.yaml}
start=$SECONDS
echo "== 1/3 SFT: $SFT_STEPS steps of 64 examples, loss on the answer only (lm-train, world 4: TP2 x PP2) -> $RUN/sft"
JOB=lm-train CONFIG="$CONFIG" SKIP_ENV=1 bash launch/torchrun.sh \
  --data sft --seq-len 10 --micro-batch-size 16 --global-batch 64 --save "$RUN/sft/megatron" \
  model.hf_path="$MODEL" train.steps="$SFT_STEPS" train.lr="$SFT_LR" logging.run_dir="$RUN/sft" \
  | grep --line-buffered -v '^{"job"' | awk '/^step/ && !(++n % 100) || /saved/ { print; fflush() }'
echo "== 2/3 export the SFT model: Megatron checkpoint -> HF (megatron-rl convert megatron-to-hf) -> $RUN/sft/hf"
python -m megatron_rl.cli convert megatron-to-hf --src "$RUN/sft/megatron" --out "$RUN/sft/hf" --no-progress \
  > "$RUN/sft/convert.log" 2>&1 || { cat "$RUN/sft/convert.log"; exit 1; }
echo "== 3/3 GRPO from the SFT model (world 4); held-out eval at step 0 (= after SFT), every 10 steps, at the end"
CONFIG="$CONFIG" SKIP_ENV=1 bash launch/torchrun.sh model.hf_path="$RUN/sft/hf" logging.run_dir="$RUN" "$@"
echo "== demo done in $((SECONDS - start)) s (SFT, export, RL)"
