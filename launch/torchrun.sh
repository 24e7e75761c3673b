#!/usr/bin/env bash
# Launch a megatron_rl job with torchrun: one node, or this node's share of a multi-node job.
#   bash launch/torchrun.sh                                  # 1 node x 4 ranks, JOB=train, CONFIG below
#   JOB=lm-train CONFIG=configs/x.yaml bash launch/torchrun.sh train.steps=5   # args = config overrides
#   JOB=preflight bash launch/torchrun.sh                    # ranks, devices, memory, versions; no model
#   # two nodes: the same command on each, MASTER_ADDR = node 0's address
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.0.1 NPROC_PER_NODE=8 bash launch/torchrun.sh   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.0.1 NPROC_PER_NODE=8 bash launch/torchrun.sh   # on node 1
# JOB: a megatron-rl command (train, lm-train, preflight) or a path to a .py script.
# Before torchrun starts, one line explains a bad launch: ranks != config world size, a missing
# CONFIG, an unreachable MASTER_ADDR (after RDZV_TIMEOUT s). After a failure the first failing
# rank, its host, phase and error are printed once, in a block headed FIRST FAILURE.
# Every rank's stdout/stderr is kept under $RUN_DIR/logs (RUN_DIR: logging.run_dir of the config);
# the console shows rank 0's progress bar, tables and messages, and any rank's error at once
# (megatron_rl/console.py). logging.verbose=true: rank 0's whole output too (torchrun's --tee).
# MAX_RESTARTS=N: when a rank dies, torchrun restarts all ranks up to N times; the trainer resumes
# from the newest complete checkpoint and rank 0 logs one "[restart]" line (default 0: fail at once).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/env.sh
if [ "${SKIP_ENV:-0}" != 1 ]; then source "$REPO/launch/env.sh"; fi  # SKIP_ENV=1: use the python on PATH
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
JOB=${JOB:-train}
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
NODE_RANK=${NODE_RANK:-}                # unset: the rendezvous orders the nodes (slurm does this)
if [ -n "${RDZV_ENDPOINT:-}" ]; then MASTER_ADDR=${RDZV_ENDPOINT%:*}; MASTER_PORT=${RDZV_ENDPOINT##*:}; fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-megatron_rl}         # must be the same on every node of one job
RDZV_TIMEOUT=${RDZV_TIMEOUT:-120}       # s to wait for MASTER_ADDR and for all nodes to join
MONITOR_INTERVAL=${MONITOR_INTERVAL:-0.5}  # s between torchrun's checks of its ranks
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-15}   # s between SIGTERM and SIGKILL when stopping ranks
MAX_RESTARTS=${MAX_RESTARTS:-0}         # times torchrun restarts every rank after one fails
LOCAL_ADDR=${LOCAL_ADDR:-}              # this node's address for the other nodes (default: its FQDN)
case "$MAX_RESTARTS" in ''|*[!0-9]*)
  echo "launch error: MAX_RESTARTS=$MAX_RESTARTS must be a non-negative integer; fix: e.g. MAX_RESTARTS=1" >&2; exit 2 ;;
esac
# torchrun keeps one rendezvous TCPStore across restarts and the restarted ranks read it without a
# per-attempt prefix: gloo would then find the dead attempt's addresses ("Connection refused").
# A fresh store per attempt (hosted by rank 0) avoids that.
if [ "$MAX_RESTARTS" -gt 0 ]; then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}; fi
overrides=("$@")
if [ -n "${RUN_DIR:-}" ]; then overrides+=("logging.run_dir=$RUN_DIR"); fi
case "$JOB" in *.py) entry=(-m megatron_rl.console "$JOB") ;; *) entry=(-m megatron_rl.cli "$JOB") ;; esac

checked=$(python -m megatron_rl.runtime.launch_check --config "$CONFIG" --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
  --master-port "$MASTER_PORT" --wait "$RDZV_TIMEOUT" -- "${overrides[@]}") || exit $?
RUN_DIR=$(sed -n 1p <<<"$checked")
IS_HOST=$(sed -n 2p <<<"$checked")
if [ "$(sed -n 3p <<<"$checked")" = 1 ]; then   # logging.verbose=true
  console=(--tee 3 --local-ranks-filter 0); unset MEGATRON_RL_CONSOLE
else   # each rank sends its own output to its files under --log-dir and keeps the console for ours
  console=(); export MEGATRON_RL_CONSOLE=quiet
fi
if [ "$IS_HOST" = 1 ]; then rm -rf "$RUN_DIR/runtime"; fi   # records of the previous launch
mkdir -p "$RUN_DIR/logs"
echo "[torchrun.sh] $JOB: $NNODES node(s) x $NPROC_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR" >&2

rc=0
torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  --rdzv-conf "join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT,is_host=$IS_HOST" \
  --max-restarts "$MAX_RESTARTS" --monitor-interval "$MONITOR_INTERVAL" --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  --log-dir "$RUN_DIR/logs/node${NODE_RANK:-$(hostname)}" ${console[@]+"${console[@]}"} \
  ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} "${entry[@]}" --config "$CONFIG" "${overrides[@]}" || rc=$?
if [ "$rc" -ne 0 ]; then
  python -m megatron_rl.runtime.report --run-dir "$RUN_DIR" --exit-code "$rc" \
    --rendezvous "$MASTER_ADDR:$MASTER_PORT" --nnodes "$NNODES" --rdzv-timeout "$RDZV_TIMEOUT" || true
fi
exit "$rc"
