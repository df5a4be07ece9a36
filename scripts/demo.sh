#!/usr/bin/env bash
# Install, then run the whole pipeline on the CPU-sized preset with offline data:
#   bash scripts/demo.sh [overrides, e.g. --home /tmp/np]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NANOPIPE_EXTRAS="${NANOPIPE_EXTRAS:-dev}" source "$root/scripts/setup.sh"
cd "$root"
exec nanopipe run --preset demo-cpu "$@"
