#!/usr/bin/env bash
# check_preempt_eval.sh MOE SOURCE_DIR thread
# check_preempt_eval.sh MOE SOURCE_DIR mpi MPIRUN...
# Preemption: `moe train` on 2 ranks (threads of one process, or 2 mpirun
# processes); once it trains, SIGTERM goes to the process (threads) or to
# rank 1 only (mpirun). The run must stop after one step on every rank, save
# that step's checkpoint (both EP ranks' expert files), exit 0 with a line
# saying so; resuming it to step K+3 must give exactly the losses of an
# uninterrupted run. Then `moe eval` of that checkpoint at 1, 2 and 4 ranks
# (threads, or mpirun -np 2 and 4) must give the same validation loss.
# The loops are bounded waits (safety nets), not timing assertions.
set -u
moe="$1"; src="$2"; mode="$3"; shift 3
mpirun=("$@")
dir="$(mktemp -d)"
job=""
cleanup() {
  if [ -n "$job" ] && kill -0 "$job" 2>/dev/null; then kill -KILL "$job"; fi
  rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "check_preempt_eval ($mode): $*"; echo "--- last output:"; tail -30 "$dir/log"; exit 1; }
launch() {  # launch NRANKS moe ARGS...: on NRANKS thread ranks or mpirun processes
  local n="$1"; shift
  # exec: when run in the background, $! is then moe's (or mpirun's) own pid.
  if [ "$mode" = mpi ]; then exec "${mpirun[@]}" -np "$n" "$moe" "$@"; else exec "$moe" "$@" --ranks "$n"; fi
}
common=("$src/configs/tiny.yaml" train.schedule=constant train.warmup=0 train.log_every=1000
        moe.capacity_factor=0 parallel.ranks=0 parallel.ep=2)

(launch 2 train "${common[@]}" train.steps=100000 --out "$dir/a") >"$dir/log" 2>&1 &
job=$!
for _ in $(seq 600); do
  [ -f "$dir/a/metrics.jsonl" ] && [ "$(wc -l <"$dir/a/metrics.jsonl")" -ge 3 ] && break
  kill -0 "$job" 2>/dev/null || fail "the job ended before training started"
  sleep 0.1
done
target="$job"
if [ "$mode" = mpi ]; then
  target=""
  for pid in $(pgrep -P "$job"); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then target=$pid; fi
  done
  [ -n "$target" ] || fail "could not find rank 1 among the children of mpirun ($job)"
fi
kill -TERM "$target"
for _ in $(seq 600); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
kill -0 "$job" 2>/dev/null && fail "the job did not end within 60 s of SIGTERM"
wait "$job"
rc=$?
job=""
[ "$rc" -eq 0 ] || fail "exit code $rc after SIGTERM, expected 0"
grep -q "preempted by .*saved its checkpoint" "$dir/log" || fail "no 'preempted by ...' line"
K=$(wc -l <"$dir/a/metrics.jsonl")
ckpts=$(ls "$dir/a/checkpoints")
[ "$ckpts" = "$(printf 'step_%08d' "$K")" ] ||
  fail "checkpoints '$ckpts' after $K metrics lines: expected exactly step $K's"
for f in shared.safetensors experts.ep0.safetensors experts.ep1.safetensors; do
  [ -f "$dir/a/checkpoints/$ckpts/$f" ] || fail "$ckpts lacks $f"
done
echo "preempted after step $K: $(grep -o 'preempted by.*' "$dir/log")"

final=$((K + 3))
(launch 2 train "${common[@]}" train.steps=$final --resume "$dir/a") >"$dir/log" 2>&1 ||
  fail "the resumed run failed"
(launch 2 train "${common[@]}" train.steps=$final --out "$dir/b") >"$dir/log" 2>&1 ||
  fail "the uninterrupted run failed"
/usr/bin/python3 - "$dir/a/metrics.jsonl" "$dir/b/metrics.jsonl" <<'PY' || fail "resumed != uninterrupted"
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
assert len(a) == len(b), f"{len(a)} vs {len(b)} steps"
for x, y in zip(a, b):
    for k in ("step", "loss", "grad_norm"):
        assert x[k] == y[k], f"step {x['step']}: {k} {x[k]!r} != {y[k]!r}"
print(f"resumed run equals the uninterrupted one bitwise over {len(a)} steps")
PY

# Eval of the same checkpoint at 1, 2, 4 ranks; eval_batches=3 (12 windows)
# leaves padding windows at 2 and 4 ranks.
"$moe" eval "$dir/b" train.eval_batches=3 --json --ranks 1 >"$dir/e1" 2>"$dir/log" || fail "eval at 1 rank"
(launch 2 eval "$dir/b" train.eval_batches=3 --json) >"$dir/e2" 2>"$dir/log" || fail "eval at 2 ranks"
(launch 4 eval "$dir/b" train.eval_batches=3 --json) >"$dir/e4" 2>"$dir/log" || fail "eval at 4 ranks"
/usr/bin/python3 - "$dir/e1" "$dir/e2" "$dir/e4" "$final" <<'PY' || fail "eval differs across layouts"
import json, sys
r = [json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:4]]
for x in r:
    assert x["step"] == int(sys.argv[4]), x
    assert x["windows"] == 12 and 0 < x["val_loss"] < 10, x
    d = abs(x["val_loss"] - r[0]["val_loss"])
    assert d <= 1e-5 * r[0]["val_loss"], f"ep {x['ep']}: {x['val_loss']} vs {r[0]['val_loss']}"
print("eval val_loss at ep 1/2/4:", [x["val_loss"] for x in r], [x["ep"] for x in r])
PY
echo "check_preempt_eval ($mode): ok"
