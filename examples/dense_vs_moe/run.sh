#!/usr/bin/env bash
# Trains the MoE model and its dense twin (every block dense, same active
# parameters per token: model.dense=true) for the same steps and tokens, then
# prints a side-by-side table.
#   examples/dense_vs_moe/run.sh [CONFIG] [key=value ...]    (default configs/quickstart.yaml)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MOE="${MOE:-$ROOT/build/bin/moe}"
CONFIG="${1:-$ROOT/configs/quickstart.yaml}"; [ $# -gt 0 ] && shift
OUT="${OUT:-$ROOT/runs/dense_vs_moe}"
rm -rf "$OUT"; mkdir -p "$OUT"
for kind in moe dense; do
  extra=(); [ "$kind" = dense ] && extra=(model.dense=true)
  # Peak resident memory from the kernel's high-water mark, sampled by the process itself at exit.
  "$MOE" train "$CONFIG" "$@" "${extra[@]}" --out "$OUT/$kind" 2>&1 | tee "$OUT/$kind.log" | grep -E "model:|done:" || true
  grep -q "done:" "$OUT/$kind.log" || { echo "dense_vs_moe: $kind run failed, see $OUT/$kind.log" >&2; exit 1; }
done
/usr/bin/python3 - "$OUT" <<'PY'
import json, re, sys, os
out = sys.argv[1]
rows = []
for kind in ("moe", "dense"):
    log = open(os.path.join(out, kind + ".log")).read()
    m = re.search(r"params total (\d+), active/token (\d+), forward FLOPs/token (\d+)", log)
    d = re.search(r"done: loss ([\d.]+) -> ([\d.]+) over (\d+) steps, (\d+) tokens/s", log)
    mem = re.search(r"peak RSS (\d+) MiB", log)
    steps = [json.loads(l) for l in open(os.path.join(out, kind, "metrics.jsonl")) if l.strip()]
    tail = steps[-max(1, len(steps) // 10):]
    rows.append((kind, int(m.group(1)), int(m.group(2)), int(m.group(3)), mem.group(1) if mem else "?",
                 float(d.group(4)), sum(s["lm_loss"] for s in tail) / len(tail)))
print(f"{'model':<6} {'total params':>13} {'active/token':>13} {'FLOPs/token':>12} {'peak RSS MiB':>13} {'tokens/s':>9} {'final lm loss':>14}")
for r in rows:
    print(f"{r[0]:<6} {r[1]:>13,} {r[2]:>13,} {r[3]:>12,} {r[4]:>13} {r[5]:>9.0f} {r[6]:>14.4f}")
print("(final lm loss: mean over the last 10% of steps)")
PY
