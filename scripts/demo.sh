#!/usr/bin/env bash
# Install, then run the whole pipeline, RL included, on the CPU-sized preset with offline data:
#   bash scripts/demo.sh [overrides, e.g. --home /tmp/np, or --run_rl=false to stop after SFT's evaluation]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the pipeline alone: no test extras (scripts/test.sh adds them to the same virtualenv)
NANOPIPE_EXTRAS="${NANOPIPE_EXTRAS-}" source "$root/scripts/setup.sh"
cd "$root"
exec nanopipe run --preset demo-cpu --run_rl=true "$@"
