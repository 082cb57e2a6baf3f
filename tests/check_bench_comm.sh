#!/usr/bin/env bash
# check_bench_comm.sh MOE BACKEND [LAUNCHER...]: runs `moe bench comm --json`
# with small sizes and checks the JSON has one result per size, positive
# throughput, and the raw MPI column exactly when the backend is mpi.
set -euo pipefail
moe="$1"; backend="$2"; shift 2
if [ "$backend" = thread ]; then extra=(--ranks 3); else extra=(); fi
out="$("$@" "$moe" bench comm --json "${extra[@]}" bench.sizes_kib=[1,64] bench.reps=3 bench.warmup=1)"
echo "$out"
/usr/bin/python3 - "$backend" "$out" <<'PY'
import json, sys
backend, doc = sys.argv[1], json.loads(sys.argv[2])
assert doc["backend"] == backend, doc["backend"]
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
