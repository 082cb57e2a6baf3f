#!/usr/bin/env bash
# multihost.sh SCENARIO MOE SOURCE_DIR: `moe train` on simulated hosts
# (network namespaces, see netns.sh) through launch/mpirun.sh -H hostfile.
#   ep2_dp2, ep4   2 hosts x 2 ranks; losses equal to `--ranks 4` (threads);
#                  EP groups inside the hosts at EP 2, node-local ranks 0,1 per host
#   ep2_span       EP 2 with parallel.ep_span_hosts: each EP group on both hosts
#                  (other EP groups than the threads' {0,1},{2,3}: dropless with a
#                  per-rank aux loss, so the losses do not depend on the grouping)
#   resume         checkpoint on 2 hosts x 2 ranks (EP 2 x DP 2), resume on
#                  1 host x 2 ranks (EP 2); losses equal to threads doing the same
#   host_killed    every process of host 2 SIGKILLed mid-run, or
#   link_down      host 2's link taken down mid-run: the job ends with exit
#                  code 3 within the bound below, the error names the lost
#                  peer, and the last checkpoint resumes on the remaining host.
# Exit 77 (skipped) where network namespaces cannot be made.
# Waits are bounded safety nets, not timing assertions.
set -u
scenario="$1"; moe="$2"; src="$3"
MH_DIR="$(mktemp -d)"
. "$src/tests/multihost/netns.sh"
cleanup() { mh_teardown; rm -rf "$MH_DIR"; }
trap cleanup EXIT
trap 'exit 1' INT TERM
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export MOE="$moe" MOE_MPIRUN_RSH_AGENT="$MH_DIR/nsrsh"
cfg="$src/configs/tiny.yaml"
fail() { echo "multihost $scenario: $*"; [ -f "$MH_DIR/log" ] && { echo "--- job output:"; tail -40 "$MH_DIR/log"; }; exit 1; }

# mpirun on the launch host (h0) over the hosts of the hostfile, ranks packed 2 per host.
launch() { mh_in0 "$src/launch/mpirun.sh" -H "$MH_DIR/hosts" -p 2 --if eth0 -- "$@"; }
# The "loss" of every step of a run, one per line.
losses() { grep -o '"loss":[^,}]*' "$1/metrics.jsonl" | cut -d: -f2; }
# Equal within 1e-5 relative, as the in-process parity tests: MPI's all-reduce
# sums the 4 ranks' float32 gradients in another order than the thread backend.
same_losses() {
  local a b
  a="$(losses "$1")"; b="$(losses "$2")"
  [ -n "$a" ] || fail "no losses in $1/metrics.jsonl"
  [ "$(echo "$a" | wc -l)" -eq "$(echo "$b" | wc -l)" ] || fail "$1 and $2 logged different step counts"
  if ! paste <(echo "$a") <(echo "$b") | awk '{ d = $1 - $2; if (d < 0) d = -d;
         if (d > 1e-5 * ($2 < 0 ? -$2 : $2)) { print "step " NR ": " $1 " vs " $2; bad = 1 } } END { exit bad }'; then
    fail "losses of $1 (mpirun on hosts) and $2 (threads) differ"
  fi
  echo "losses equal within 1e-5 ($(echo "$a" | wc -l) steps, last $(echo "$a" | tail -1))"
}

# parity EP "HOSTS LINE" [overrides]: 2 hosts x 2 ranks vs 4 rank threads; rank 0
# logs the placement ("hosts: ..." line) and each rank's node-local rank.
parity() {
  local ep="$1" placement="$2"; shift 2
  mh_setup 2 || fail "namespace setup failed"
  launch train "$cfg" parallel.ep="$ep" train.steps=12 "$@" --out "$MH_DIR/hosts_run" >"$MH_DIR/log" 2>&1 ||
    fail "mpirun.sh exited $?"
  grep -q "ep $ep x dp $((4 / ep))" "$MH_DIR/log" || fail "the job did not run at EP $ep x DP $((4 / ep)) on 4 ranks"
  grep -qF "hosts: $placement" "$MH_DIR/log" || fail "placement is not 'hosts: $placement'"
  grep -qF "rank 0 (local 0) cpu, rank 1 (local 1) cpu, rank 2 (local 0) cpu, rank 3 (local 1) cpu" "$MH_DIR/log" ||
    fail "node-local ranks are not 0,1 on each host"
  "$moe" train "$cfg" parallel.ep="$ep" train.steps=12 "$@" --ranks 4 --out "$MH_DIR/thread_run" >"$MH_DIR/tlog" 2>&1 ||
    fail "the thread run failed: $(tail -5 "$MH_DIR/tlog")"
  same_losses "$MH_DIR/hosts_run" "$MH_DIR/thread_run"
}

resume() {  # 2 hosts x 2 ranks -> 1 host x 2 ranks, and the same with threads
  mh_setup 2 || fail "namespace setup failed"
  launch train "$cfg" parallel.ep=2 train.steps=6 --out "$MH_DIR/hosts_run" >"$MH_DIR/log" 2>&1 ||
    fail "the 2-host run exited $?"
  "$moe" train "$cfg" parallel.ep=2 train.steps=6 --ranks 4 --out "$MH_DIR/thread_run" >"$MH_DIR/tlog" 2>&1 ||
    fail "the thread run failed"
  printf '10.77.0.11 slots=2\n' >"$MH_DIR/hosts"  # host 1 only
  launch train "$cfg" parallel.ep=2 train.steps=12 --resume "$MH_DIR/hosts_run" >"$MH_DIR/log" 2>&1 ||
    fail "the resume on 1 host exited $?"
  grep -q "2 ranks (mpi), ep 2 x dp 1" "$MH_DIR/log" || fail "the resume did not run on 2 ranks at EP 2"
  "$moe" train "$cfg" parallel.ep=2 train.steps=12 --ranks 2 --resume "$MH_DIR/thread_run" >"$MH_DIR/tlog" 2>&1 ||
    fail "the thread resume failed"
  same_losses "$MH_DIR/hosts_run" "$MH_DIR/thread_run"
}

# Host faults. Bound on the job's end after the fault, stated in the README:
#   timeout_s (the survivors' collective times out)
#   + 2 s (liveness probe that names the lost ranks) + 2 s (report window before MPI_Abort)
#   + 10 s (launch/mpirun.sh's grace for mpirun after MPI_Abort) + 1 s (its polling)
#   = timeout_s + 15 s. Checked with a 5 s margin as the safety net.
fault() {
  local timeout_s=5 bound=$((5 + 15 + 5))
  mh_setup 2 || fail "namespace setup failed"
  launch train "$cfg" parallel.ep=2 parallel.timeout_s=$timeout_s train.steps=100000 train.ckpt_every=2 \
    train.log_every=1 --out "$MH_DIR/run" >"$MH_DIR/log" 2>&1 &
  local job=$! _
  # Mid-run: after the step-4 checkpoint exists.
  for _ in $(seq 1200); do
    [ -d "$MH_DIR/run/checkpoints/step_00000004" ] && break
    kill -0 "$job" 2>/dev/null || fail "the job ended before its step-4 checkpoint"
    sleep 0.1
  done
  [ -d "$MH_DIR/run/checkpoints/step_00000004" ] || fail "no step-4 checkpoint within 120 s"
  local t0=$SECONDS
  if [ "$1" = kill ]; then mh_kill_host 2; echo "killed every process of host 2"; else mh_cut_host 2; echo "took host 2's link down"; fi
  for _ in $(seq $((bound * 10))); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$job" 2>/dev/null; then
    kill -TERM "$job"
    fail "the job did not end within the bound of $bound s after the fault"
  fi
  wait "$job"; local rc=$?
  echo "job ended $((SECONDS - t0)) s after the fault with exit code $rc"
  tail -25 "$MH_DIR/log"
  [ "$rc" -eq 3 ] || fail "exit code $rc, expected 3 (communication failure)"
  # The lost peers are named: by both ranks of host 1 when their collective
  # times out (a cut link), or by mpirun when it lost host 2's daemon first (a
  # killed host: mpirun then ends the ranks before their timeout).
  local r named=1
  for r in 0 1; do
    grep -qE "CommError: rank $r: .*rank 2 \(host2\), rank 3 \(host2\)" "$MH_DIR/log" || named=0
  done
  if [ "$named" -eq 0 ]; then
    [ "$1" = kill ] || fail "ranks 0 and 1 do not both name ranks 2 and 3 (host2)"
    grep -q "Remote daemon: .* on node 10.77.0.12" "$MH_DIR/log" ||
      fail "neither the surviving ranks nor mpirun name the lost host (host2, 10.77.0.12)"
  fi
  # Every process of the surviving host has ended with the job.
  for _ in $(seq 50); do [ -z "$(ip netns pids "$(mh_ns 1)")" ] && break; sleep 0.1; done
  [ -z "$(ip netns pids "$(mh_ns 1)")" ] || fail "processes of host 1 outlived the job: $(ip netns pids "$(mh_ns 1)")"
  # The newest checkpoint is valid: resume on the remaining host (2 ranks).
  local last
  last="$(ls -d "$MH_DIR"/run/checkpoints/step_* | grep -v '\.tmp$' | tail -1)"
  echo "newest checkpoint: $(basename "$last")"
  mh_kill_host 2
  printf '10.77.0.11 slots=2\n' >"$MH_DIR/hosts"
  local step=$((10#${last##*step_}))
  launch train "$cfg" parallel.ep=2 train.steps=$((step + 2)) train.log_every=1 --resume "$MH_DIR/run" \
    >"$MH_DIR/log" 2>&1 || fail "resume on the remaining host exited $?"
  grep -q "step $((step + 2))/$((step + 2))" "$MH_DIR/log" || fail "the resume did not reach step $((step + 2))"
  echo "resumed from step $step on host 1 (2 ranks) to step $((step + 2))"
}

case "$scenario" in
  ep2_dp2) parity 2 "2 hosts x 2 ranks per host; EP group 0: ranks 0,1 on host1; EP group 1: ranks 2,3 on host2" ;;
  ep2_span) parity 2 "2 hosts x 2 ranks per host; EP group 0: ranks 0,2 on host1+host2; EP group 1: ranks 1,3 on host1+host2" \
              parallel.ep_span_hosts=true moe.capacity_factor=0 moe.aux_loss_scope=local ;;
  ep4) parity 4 "2 hosts x 2 ranks per host; EP group 0: ranks 0,1,2,3 on host1+host2" ;;
  resume) resume ;;
  host_killed) fault kill ;;
  link_down) fault cut ;;
  *) echo "multihost.sh: unknown scenario '$scenario'"; exit 2 ;;
esac
echo "multihost $scenario: ok"
