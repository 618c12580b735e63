#!/usr/bin/env bash
# The main job of the README: set up the environment if needed, build and validate the demo datasets, then run the
# quickstart (LiteMedSAM + LoRA on mni-tissue, pretrained vs from scratch with the same budget) and print its table.
# Extra arguments go to `medseg quickstart` as Hydra overrides (e.g. trainer.max_steps=60).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
medseg prepare synthetic mni-tissue --check
medseg quickstart "$@"
