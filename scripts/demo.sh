#!/usr/bin/env bash
# Install, then run the whole pipeline, RL included, on the CPU-sized preset with offline data:
#   bash scripts/demo.sh [overrides, e.g. --home /tmp/np, or --run_rl=false to stop after SFT's evaluation]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NANOPIPE_EXTRAS="${NANOPIPE_EXTRAS:-dev}" source "$root/scripts/setup.sh"
cd "$root"
exec nanopipe run --preset demo-cpu --run_rl=true "$@"
