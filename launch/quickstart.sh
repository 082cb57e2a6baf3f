#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a small MoE
# language model trained on 4 simulated ranks in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install-deps.sh"
"$ROOT/launch/build.sh"
MOE="${BUILD_DIR:-$ROOT/build}/bin/moe"
echo "[quickstart] resolved config:"
"$MOE" config show "$ROOT/configs/quickstart.yaml" "$@"
echo "[quickstart] training lands with the training issue; meanwhile: all-to-all over 4 simulated ranks"
"$MOE" bench comm "$ROOT/configs/quickstart.yaml" --ranks 4 "$@"
