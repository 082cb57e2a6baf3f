#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a small byte-level
# MoE language model (8 experts, EP 4) trained on 4 simulated ranks in one
# process, then plots its metrics and prints a sample of generated text.
# Extra arguments are config overrides,
# e.g. launch/quickstart.sh train.steps=100
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install-deps.sh"
"$ROOT/launch/build.sh"
MOE="${BUILD_DIR:-$ROOT/build}/bin/moe"
OUT="${OUT:-$ROOT/runs/quickstart}"
rm -rf "$OUT"
"$MOE" train "$ROOT/configs/quickstart.yaml" --out "$OUT" "$@"
/usr/bin/python3 "$ROOT/examples/plot_metrics.py" "$OUT"
# The trained model on the held-out text, at any number of ranks (here 1).
"$MOE" eval "$OUT" --ranks 1
echo "[quickstart] a sample from the trained model (moe generate):"
MOE_LOG_LEVEL=warn "$MOE" generate "$OUT" --prompt "Q: " --tokens 200 --temperature 0.8 --top-k 40 --seed 1
echo "[quickstart] run directory: $OUT (config.yaml, metrics.jsonl, memory.json, checkpoints/, loss.png, expert_load.png)"
