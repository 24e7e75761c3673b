#!/usr/bin/env bash
# The main job: GRPO on a tiny random-init Llama, on CPU, world 4. Every rank trains
# (megatron-core TP2 x PP2, shared-prefix packed groups) and generates (vLLM TP1 x 4 replicas);
# weights move shard-to-shard after every step. Prints the reward curve at the end.
#   bash launch/demo.sh                         # configs/tiny_cpu.yaml, a fresh run in runs/demo
#   bash launch/demo.sh train.steps=10          # any config override
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=${RUN:-runs/demo}
MODEL=${MODEL:-runs/tiny-llama}

if [ ! -f "$MODEL/config.json" ]; then
  python tools/make_tiny_model.py --family llama --out "$MODEL"
fi
rm -rf "$RUN"   # a fresh run each time (a kept run directory would resume from its checkpoint)
CONFIG=${CONFIG:-configs/tiny_cpu.yaml} SKIP_ENV=1 bash launch/torchrun.sh \
  model.hf_path="$MODEL" logging.run_dir="$RUN" checkpoint.dir="$RUN/ckpt" "$@"
