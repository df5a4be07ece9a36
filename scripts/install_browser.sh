#!/usr/bin/env bash
# Install Debian's chromium for the Prefect UI test (tests/test_ui.py drives it through the playwright
# package; playwright's own browser downloads are never used). Idempotent: does nothing when chromium is
# already there. Needs root (or passwordless sudo) and apt; otherwise it says why and leaves the test to
# skip itself with that reason.
#
#   bash scripts/install_browser.sh
set -euo pipefail

browser="${NANOPIPE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$browser" ]; then
  echo "[browser] $browser is installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[browser] no apt-get on this machine: install chromium yourself to run the UI test" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo "[browser] not root and no passwordless sudo: skipping the chromium install (the UI test will skip)" >&2
  exit 0
fi
echo "[browser] installing chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
if [ -x "$browser" ]; then
  echo "[browser] installed $browser"
else
  echo "[browser] apt-get finished but $browser is missing" >&2
  exit 1
fi
