#!/usr/bin/env bash
# The `gpu` profile in one command on a lent GPU machine: preflight, then the run under time
# budgets, evidence in OUT however it ends (at most 8 files). Runs flipctr from src on the
# machine's own torch and transformers; installs nothing. Options: benchmarks/gpu/oneshot.py.
#
#   bash benchmarks/gpu/oneshot.sh PACK OUT [--seconds 540] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
unset WORLD_SIZE
exec python3 benchmarks/gpu/oneshot.py "$@"
