#!/usr/bin/env bash
# The test command of the README: set up the environment if needed, check style, run the test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k geometry`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
ruff check medseg tests tools
ruff format --check medseg tests tools
exec python -m pytest "$@"
