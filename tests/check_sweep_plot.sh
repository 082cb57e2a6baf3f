#!/usr/bin/env bash
# A 4-point sweep (ranks x capacity factor) on the tiny config, then
# examples/plot_sweep.py: the sweep calibrates this machine first, and every
# plot the grid supports must be written.
# Usage: check_sweep_plot.sh MOE_BINARY SOURCE_DIR
set -euo pipefail
moe=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/sweep.yaml" <<YAML
base: $src/configs/tiny.yaml
hardware: calibrate
steps: 3
overrides: [train.log_every=1000]
grid:
  ranks: [1, 2]
  moe.capacity_factor: [0, 1.0]
YAML
"$moe" sweep "$work/sweep.yaml" --out "$work/out"
/usr/bin/python3 "$src/examples/plot_sweep.py" "$work/out"
test -s "$work/out/hardware.yaml" || { echo "no calibration written" >&2; exit 1; }
for png in scaling phases predicted_vs_measured drop_vs_capacity; do
  test -s "$work/out/$png.png" || { echo "missing $png.png" >&2; exit 1; }
done
echo "sweep plots written"
