#!/usr/bin/env bash
# The checkpoint round trip: a tiny HF model -> Megatron TP2xPP2 checkpoint -> a few LM training
# steps (megatron-core, torchrun) -> back to HF, and a report.
#   bash launch/convert_demo.sh               # defaults below; override any with env vars
#   FAMILY=qwen2 STEPS=6 bash launch/convert_demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/env.sh

FAMILY=${FAMILY:-llama}          # llama | qwen2 | qwen3 (tiny, random weights, built offline)
TP=${TP:-2}
PP=${PP:-2}
NPROC=$((TP * PP))
STEPS=${STEPS:-4}
LR=${LR:-1e-3}
RUN=${RUN:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

rm -rf "$RUN" && mkdir -p "$RUN"
echo "== 1/5 tiny $FAMILY model (HF, random weights) -> $RUN/hf"
python tools/make_tiny_model.py --family "$FAMILY" --out "$RUN/hf"

echo "== 2/5 HF -> Megatron TP${TP}xPP${PP} -> $RUN/megatron"
python tools/convert_checkpoint.py hf-to-megatron --src "$RUN/hf" --out "$RUN/megatron" --tp "$TP" --pp "$PP" --no-progress

echo "== 3/5 train $STEPS steps at TP${TP}xPP${PP} (torchrun x$NPROC) -> $RUN/megatron-trained"
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_rl.cli lm-train --config configs/tiny_cpu.yaml \
  --load "$RUN/megatron" --save "$RUN/megatron-trained" \
  model.hf_path="$RUN/hf" parallel.tp="$TP" parallel.pp="$PP" parallel.world_size="$NPROC" \
  train.steps="$STEPS" train.lr="$LR" 2> "$RUN/train.stderr" | tee "$RUN/train.log"

echo "== 4/5 Megatron -> HF: the converted checkpoint and the trained one"
python tools/convert_checkpoint.py megatron-to-hf --src "$RUN/megatron" --out "$RUN/hf-roundtrip" --no-progress
python tools/convert_checkpoint.py megatron-to-hf --src "$RUN/megatron-trained" --out "$RUN/hf-trained" --no-progress

echo "== 5/5 report"
grep '^step ' "$RUN/train.log"
python -m megatron_rl.checkpoint.compare "$RUN/hf" "$RUN/hf-roundtrip" --name "round trip HF->Megatron->HF" | tee "$RUN/report.txt"
python -m megatron_rl.checkpoint.compare "$RUN/hf" "$RUN/hf-trained" --name "trained vs initial" | tee -a "$RUN/report.txt"
python - "$RUN/report.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
rt, trained = rows
ok = rt["bitwise_equal"] == rt["tensors"] and rt["max_abs_logit_diff"] == 0.0 and trained["max_abs_weight_diff"] > 0
print(f"demo {'OK' if ok else 'FAILED'}: round trip bitwise on {rt['bitwise_equal']}/{rt['tensors']} tensors; "
      f"training changed {rt['tensors'] - trained['bitwise_equal']} tensors (max |dw| {trained['max_abs_weight_diff']:.3g})")
sys.exit(0 if ok else 1)
EOF
