#!/usr/bin/env bash
# check_bench_comm.sh MOE BACKEND [LAUNCHER...]: runs `moe bench comm --json`
# with small sizes and checks the JSON has one result per size, positive
# throughput, the raw MPI column exactly when the backend is mpi, and the
# world it ran in: 3 thread ranks, or the -np given to the launcher.
set -euo pipefail
moe="$1"; backend="$2"; shift 2
if [ "$backend" = thread ]; then extra=(--ranks 3); world=3; else extra=(); world=""; fi
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = -np ] && world="${args[$((i + 1))]}"; done
[ -n "$world" ] || { echo "check_bench_comm: no -np in the launcher command"; exit 2; }
out="$("$@" "$moe" bench comm --json "${extra[@]}" bench.sizes_kib=[1,64] bench.reps=3 bench.warmup=1)"
echo "$out"
/usr/bin/python3 - "$backend" "$out" "$world" <<'PY'
import json, sys
backend, doc, world = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
assert doc["backend"] == backend, doc["backend"]
assert doc["world"] == world, "world %s, expected %d ranks" % (doc["world"], world)
rows = doc["results"]
assert [r["bytes_per_peer"] for r in rows] == [1024, 65536], rows
for r in rows:
    assert r["moe_gbps"] > 0, r
    if backend == "mpi":
        assert r["raw_mpi_gbps"] > 0, r
    else:
        assert r["raw_mpi_gbps"] is None, r
print("bench comm json ok")
PY
