#!/usr/bin/env bash
# Install what the tests need, then run them: bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
# The Prefect UI test drives Debian's chromium; install it when we can (root + apt), else it skips.
bash "$root/scripts/install_browser.sh" || echo "[test] chromium could not be installed: the UI test will skip"
cd "$root"
# Two test processes (pytest-xdist), each given whole modules, so a module's fixtures (a trained tokenizer,
# a Prefect server) are built once and a module that reads the session's test list sees all of its own tests:
# most tests wait on a stage subprocess, so two keep both cores of a small machine busy.
# NANOPIPE_TEST_WORKERS=0 runs every test in this one process.
workers="${NANOPIPE_TEST_WORKERS:-2}"
if [ "$workers" != "0" ]; then set -- -n "$workers" --dist loadfile "$@"; fi
exec python -m pytest "$@"
