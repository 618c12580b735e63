#!/usr/bin/env bash
# The main job of the README: set up the environment if needed, build the demo datasets, validate them and print
# their summary. Extra arguments go to `medseg prepare`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
medseg prepare synthetic mni-tissue --check "$@"
