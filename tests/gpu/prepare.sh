#!/usr/bin/env bash
# Download the pure wheels tests/gpu/run.sh needs on a GPU machine that has torch and transformers
# but no network (Python 3.12, x86-64): megatron-core and its small dependencies, into .whl/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for w in megatron-core==0.16.1 psutil==7.2.2 pyyaml==6.0.3; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$w"
done
ls -la .whl
