#!/usr/bin/env bash
# Create or refresh the project's virtual environment. Sourced by tools/demo.sh and tools/test.sh.
# It installs the tested set pinned in constraints.txt, and does nothing when pyproject.toml and constraints.txt
# have not changed since the last install (a stamp in the venv records their hash).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEDSEG_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.medseg-install-stamp"
want="$(cat "$repo/pyproject.toml" "$repo/constraints.txt" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing medseg and its tested dependencies (constraints.txt); first time takes a few minutes"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$repo/constraints.txt" -e "$repo[dev,napari,nnunet]"
  # the sam2 extra: an sdist whose build imports torch, so it builds against the torch just installed (no isolation)
  "$venv/bin/python" -m pip install --quiet "setuptools>=77"
  SAM2_BUILD_CUDA=0 "$venv/bin/python" -m pip install --quiet --no-build-isolation -c "$repo/constraints.txt" "sam2==1.1.0"
  echo "$want" > "$stamp"
else
  echo "[setup] environment up to date ($venv)"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
