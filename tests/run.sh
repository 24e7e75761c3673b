#!/usr/bin/env bash
# The test command: set up (or refresh) .venv, then run the whole suite.
#   bash tests/run.sh            # everything (tiers: unit, multirank; gpu tests skip without CUDA)
#   bash tests/run.sh -m unit    # pure CPU unit tests only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest tests -q -ra -p no:cacheprovider --timeout=900 "$@"
