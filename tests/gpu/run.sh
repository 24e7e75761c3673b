#!/usr/bin/env bash
# The prepared check for one real GPU: torch + megatron-core only (no vLLM), < 8 minutes, one JSON line.
#   here (with network):   bash tests/gpu/prepare.sh      # wheels for the GPU machine into .whl/ (git-ignored)
#   on the GPU machine:    bash tests/gpu/run.sh          # installs .whl/ if present, then runs the check
# What it covers: tests/gpu/check.py's docstring. Its CPU twin (--smoke) runs in the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 python3 tests/gpu/check.py "$@"
