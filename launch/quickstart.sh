#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a small MoE
# language model trained on 4 simulated ranks in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install-deps.sh"
"$ROOT/launch/build.sh"
MOE="${BUILD_DIR:-$ROOT/build}/bin/moe"
OUT="${OUT:-$ROOT/runs/quickstart}"
echo "[quickstart] resolved config:"
"$MOE" config show "$ROOT/configs/quickstart.yaml" "$@"
echo "[quickstart] training is not implemented yet; the config above is what it will run"
