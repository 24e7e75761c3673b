#!/usr/bin/env bash
# Create or refresh the project virtualenv at <repo>/.venv. Sourced by the two README commands.
# Idempotent: reinstalls only when setup.py or this file changed (a stamp holds their hash).
# EXTRAS selects the install: "cpu,test,metrics,data" here; "gpu,test,metrics,data" on GPU clusters.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,test,metrics,data}
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.megatron_rl_stamp"
want=$(cat "$REPO_ROOT/setup.py" "$REPO_ROOT/launch/env.sh" | sha256sum | cut -c1-16)-$EXTRAS
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "[env] installing megatron_rl[$EXTRAS] into $VENV (first time: about 2 minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "WARNING: Location" >&2 || true
  # (grep drops pip's noise about this machine's empty local index folders)
  "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[$EXTRAS]" 2> >(grep -v "WARNING: Location" >&2)
  # The registry serves CUDA builds of these; vLLM's import fails on torchcodec without CUDA libs.
  case "$EXTRAS" in *cpu*) "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true ;; esac
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# vLLM and torch-inductor caches stay inside the repo's run directory, never in /tmp or $HOME.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$REPO_ROOT/runs/.cache/inductor}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$REPO_ROOT/runs/.cache/vllm}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
