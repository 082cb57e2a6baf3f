#!/usr/bin/env bash
# Runs `moe` under mpirun, one rank per process, on one or several machines.
#   launch/mpirun.sh -n 8 [-H hostfile] [-p ranks_per_node] [--bind core|none] -- train configs/x.yaml --out runs/x
# Everything after `--` is passed to build/bin/moe. The backend is chosen by
# parallel.backend (auto = mpi under mpirun; nccl on GPU machines).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="${MOE:-$ROOT/build/bin/moe}"
NP=2; HOSTFILE=""; PER_NODE=""; BIND="none"
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--np) NP="$2"; shift 2 ;;
    -H|--hostfile) HOSTFILE="$2"; shift 2 ;;
    -p|--per-node) PER_NODE="$2"; shift 2 ;;
    --bind) BIND="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "mpirun.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "mpirun.sh: give the moe command after --, e.g. -- train configs/tiny.yaml" >&2; exit 2; }
[ -x "$MOE" ] || { echo "mpirun.sh: $MOE not built; run launch/build.sh" >&2; exit 2; }
ARGS=(-np "$NP" --bind-to "$BIND")
[ -n "$HOSTFILE" ] && ARGS+=(--hostfile "$HOSTFILE")
[ -n "$PER_NODE" ] && ARGS+=(--map-by "ppr:${PER_NODE}:node")
# Single machine with fewer cores than ranks: allow oversubscription.
[ -z "$HOSTFILE" ] && ARGS+=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && ARGS+=(--allow-run-as-root)
exec mpirun "${ARGS[@]}" "$MOE" "$@"
