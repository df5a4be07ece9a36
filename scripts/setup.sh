#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv and install nanopipe into it.
# Idempotent and fast when nothing changed. Sourced by scripts/demo.sh and scripts/test.sh.
#
#   NANOPIPE_VENV=path        where the virtualenv lives (default: .venv in the repo)
#   NANOPIPE_TORCH_SPEC=spec  what to install for torch (default: torch==2.13.0, the CPU build, unless
#                             an NVIDIA driver is present; then a plain 'torch', which is a CUDA build)
#   NANOPIPE_EXTRAS=dev       extras to install (default 'dev', which the tests need; empty: none)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NANOPIPE_VENV:-$root/.venv}"
extras="${NANOPIPE_EXTRAS-dev}"
python="${PYTHON:-python3}"

if [ -z "${NANOPIPE_TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NANOPIPE_TORCH_SPEC="torch"
  else
    NANOPIPE_TORCH_SPEC="torch==2.13.0"
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.nanopipe-installed"
installed="$(cat "$stamp" 2>/dev/null || true)"
base="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16) $NANOPIPE_TORCH_SPEC"
want="$base $extras"
# up to date: the same install, or (asking for no extras) the same one with extras
if [ "$installed" != "$want" ] && { [ -n "$extras" ] || [ "${installed#"$base "}" = "$installed" ]; }; then
  echo "[setup] installing $NANOPIPE_TORCH_SPEC and nanopipe${extras:+[$extras]} into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: the project's own 'torch>=2.4' then keeps it instead of pulling a CUDA build
  "$venv/bin/python" -m pip install -q "$NANOPIPE_TORCH_SPEC"
  "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
