#!/usr/bin/env bash
# The test command of the README: set up the environment if needed, check style and the import layers (lint-imports,
# see the README's "Architecture"), run the test suite, then the napari widget tests (marker qt) on a virtual display.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k geometry`.
# The qt tests need xvfb and Qt's X libraries (tools/qt_deps.sh installs them as root); without them they are skipped
# with a hint, unless MEDSEG_REQUIRE_QT=1 (CI), which installs them or fails.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
ruff check medseg tests tools
ruff format --check medseg tests tools
lint-imports
python -m pytest "$@"

if [ "${MEDSEG_REQUIRE_QT:-0}" = "1" ]; then
  bash tools/qt_deps.sh
elif ! bash tools/qt_deps.sh --check; then
  echo "[test] qt tests skipped: run 'sudo bash tools/qt_deps.sh' to install a virtual display, then rerun."
  exit 0
fi
# "$@" first, so that `-m qt` selects the widget tests among the paths and -k filters given; status 5: none selected.
status=0
xvfb-run -a env QT_QPA_PLATFORM=xcb python -m pytest "$@" -m qt || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
  exit "$status"
fi
