#!/usr/bin/env bash
# Runs `moe` under mpirun, one rank per process, on one or several machines.
#   launch/mpirun.sh -n 8 [-H hostfile] [-p ranks_per_node] [--if IFACE] [--bind core|none] -- train configs/x.yaml --out runs/x
# Everything after `--` is passed to build/bin/moe. The backend is chosen by
# parallel.backend (auto = mpi under mpirun; nccl on GPU machines).
#   -H FILE    Open MPI hostfile ("node1 slots=4" per line); -n defaults to the slots
#   -p N       ranks per node (--map-by ppr:N:node): ranks are packed host by host
#   --if IFACE the network interface MPI and its daemons use between hosts (eth0, ib0, ...)
# With several hosts, a lost host ends the job with exit code 3 (see README, "When a host dies").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="${MOE:-$ROOT/build/bin/moe}"
NP=""; HOSTFILE=""; PER_NODE=""; BIND="none"; IFACE=""
# The command Open MPI starts its remote daemons with (ssh by default); the
# multi-host tests set it to an agent that enters a network namespace.
RSH_AGENT="${MOE_MPIRUN_RSH_AGENT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--np) NP="$2"; shift 2 ;;
    -H|--hostfile) HOSTFILE="$2"; shift 2 ;;
    -p|--per-node) PER_NODE="$2"; shift 2 ;;
    --if) IFACE="$2"; shift 2 ;;
    --bind) BIND="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "mpirun.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "mpirun.sh: give the moe command after --, e.g. -- train configs/tiny.yaml" >&2; exit 2; }
[ -x "$MOE" ] || { echo "mpirun.sh: $MOE not built; run launch/build.sh" >&2; exit 2; }
[ -z "$HOSTFILE" ] || [ -r "$HOSTFILE" ] || { echo "mpirun.sh: hostfile '$HOSTFILE' not readable" >&2; exit 2; }
ARGS=(--bind-to "$BIND")
# Without -n: 2 ranks on one machine; with a hostfile mpirun fills its slots.
if [ -n "$NP" ]; then ARGS+=(-np "$NP"); elif [ -z "$HOSTFILE" ]; then ARGS+=(-np 2); fi
[ -n "$PER_NODE" ] && ARGS+=(--map-by "ppr:${PER_NODE}:node")
[ "$(id -u)" -eq 0 ] && ARGS+=(--allow-run-as-root)
if [ -z "$HOSTFILE" ]; then
  # Single machine with fewer cores than ranks: allow oversubscription.
  ARGS+=(--oversubscribe)
  exec mpirun "${ARGS[@]}" "$MOE" "$@"
fi

# Several hosts. TCP between hosts (ob1 + tcp; shared memory stays inside a
# host through `vader` when it is not excluded). Keepalive probes on mpirun's
# daemon connections: an unreachable host is noticed after ~16 s of silence
# (10 s idle + 3 probes 2 s apart) instead of never; with no tree spawn every
# daemon talks to mpirun directly, so a dead host cannot cut others off.
ARGS+=(--hostfile "$HOSTFILE" --mca pml ob1 --mca plm_rsh_no_tree_spawn 1
       --mca oob_tcp_keepalive_time 10 --mca oob_tcp_keepalive_intvl 2 --mca oob_tcp_keepalive_probes 3)
[ -n "$IFACE" ] && ARGS+=(--mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE")
[ -n "$RSH_AGENT" ] && ARGS+=(--mca plm_rsh_agent "$RSH_AGENT")

# Supervise mpirun: after MPI_Abort mpirun waits for every daemon to confirm
# its ranks are gone, and a daemon on an unreachable host never answers (it
# hung for minutes in our tests). So once a rank has aborted, mpirun gets
# ABORT_GRACE_S seconds to end, then it is killed and the abort's code is
# returned. A host whose daemon mpirun lost (killed or unreachable) is a
# communication failure: exit code 3 whatever mpirun's own code was.
ABORT_GRACE_S="${MOE_MPIRUN_ABORT_GRACE_S:-10}"
errlog="$(mktemp)"
trap 'rm -f "$errlog"' EXIT
mpirun "${ARGS[@]}" "$MOE" "$@" 2> >(tee "$errlog" >&2) &
mp=$!
trap 'kill -TERM "$mp" 2>/dev/null' INT TERM
abort_code=""; aborted_at=""
while kill -0 "$mp" 2>/dev/null; do
  if [ -z "$aborted_at" ] && grep -q "MPI_ABORT was invoked" "$errlog"; then
    aborted_at=$SECONDS
    abort_code="$(grep -A1 -m1 "MPI_ABORT was invoked" "$errlog" | sed -n 's/.*errorcode \([0-9]*\).*/\1/p' | head -1)"
  fi
  if [ -n "$aborted_at" ] && [ $((SECONDS - aborted_at)) -ge "$ABORT_GRACE_S" ]; then
    echo "mpirun.sh: mpirun still waits ${ABORT_GRACE_S} s after MPI_Abort (a host is unreachable); ending it" >&2
    # KILL, not TERM: on TERM mpirun retries the same abort and waits again.
    # Its daemons on reachable hosts then lose mpirun and end their ranks.
    kill -KILL "$mp" 2>/dev/null || true
    break
  fi
  sleep 0.5
done
set +e
{ wait "$mp"; } 2>/dev/null; rc=$?  # (no "Killed" notice from bash)
set -e
if [ -n "$aborted_at" ] && [ -n "$abort_code" ]; then
  rc="$abort_code"
elif [ "$rc" -ne 0 ] && grep -qE "lost communication with a remote daemon|unable to reliably start one or more daemons|daemon on node .* failed" "$errlog"; then
  echo "mpirun.sh: mpirun lost a host (its daemon was killed or became unreachable): exit 3 (communication failure)" >&2
  rc=3
fi
exit "$rc"
