#!/usr/bin/env bash
# check_mpirun_fatal.sh MOE SOURCE_DIR MPIRUN...: `moe train` under mpirun
# with 2 ranks; once training runs, rank 1 is stopped (SIGSTOP: a stalled
# rank). Rank 0's next collective times out with a CommError, which must end
# the whole job -- the stopped rank included -- with exit code 3. Pass mpirun
# `--mca orte_abort_on_non_zero_status 0` (ctest does) so that it is moe's
# own abort, not mpirun reacting to rank 0's exit, that ends the job. The
# loops below are safety nets (bounded waits), not timing assertions.
set -u
moe="$1"; src="$2"; shift 2
dir="$(mktemp -d)"
rank1=""
cleanup() {
  if [ -n "$rank1" ] && kill -0 "$rank1" 2>/dev/null; then kill -CONT "$rank1"; kill -KILL "$rank1"; fi
  rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "check_mpirun_fatal: $*"; echo "--- job output:"; tail -30 "$dir/log"; exit 1; }

"$@" "$moe" train "$src/configs/tiny.yaml" train.steps=100000 train.log_every=1000 \
  parallel.timeout_s=3 --out "$dir/run" >"$dir/log" 2>&1 &
job=$!
# Training is under way once rank 0 has written a metrics line.
for _ in $(seq 600); do
  [ -s "$dir/run/metrics.jsonl" ] && break
  kill -0 "$job" 2>/dev/null || fail "the job ended before training started"
  sleep 0.1
done
[ -s "$dir/run/metrics.jsonl" ] || { kill -TERM "$job"; fail "no metrics line within 60 s"; }
# Rank 1: the child of this mpirun whose environment says OMPI_COMM_WORLD_RANK=1.
for pid in $(pgrep -P "$job"); do
  if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then rank1=$pid; fi
done
[ -n "$rank1" ] || { kill -TERM "$job"; fail "could not find rank 1 among the children of mpirun ($job)"; }
kill -STOP "$rank1"
echo "stopped rank 1 (pid $rank1)"
# Bounded wait for the job (a hang would otherwise leave it to ctest's timeout).
for _ in $(seq 600); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$job" 2>/dev/null; then kill -TERM "$job"; fail "the job did not end within 60 s of rank 1 stalling"; fi
wait "$job"
rc=$?
tail -15 "$dir/log"
[ "$rc" -eq 3 ] || fail "exit code $rc, expected 3 (CommError)"
grep -q "CommError" "$dir/log" || fail "no CommError in the output"
for _ in $(seq 50); do kill -0 "$rank1" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$rank1" 2>/dev/null; then fail "the stalled rank 1 (pid $rank1) outlived the job"; fi
echo "check_mpirun_fatal: ok (exit 3, CommError, every rank gone)"
