#!/usr/bin/env bash
# One command on a GPU machine: builds against the active python3's CUDA
# LibTorch (a venv with torch 2.x + CUDA) and runs the GPU checks, writing
# OUTDIR/gpu-report.json and OUTDIR/gpu-check.log.
#
#   launch/gpu-bundle.sh                  # first, on a machine with apt (see there)
#   launch/gpu-check.sh OUTDIR            # then on the GPU machine, from the repository root
#
# The GPU machine needs: python3 with a CUDA torch, nvcc (the CUDA toolkit,
# MOE_CUDA_ROOT or the folder above nvcc's), cmake, a C++ compiler. What it
# lacks (yaml-cpp, CLI11, nlohmann-json, GoogleTest, Open MPI) comes from the
# bundle, .deps/gpu-bundle (BUNDLE to change), when present.
#
# Steps (each one's failure is recorded, not fatal to the rest):
#   build          configure + build build-gpu/ (LibTorch, CUDA, NCCL, MPI as found)
#   gpu_tests      every test binary's GPU cases (gtest filter *Gpu*:*Cuda*): layer
#                  forward/backward GPU vs CPU, EP parity on 2 thread ranks, CUDA
#                  tensors on ThreadComm, NCCL conformance at world 1 (and 2 when NCCL
#                  allows two ranks on one GPU: >= 2.30 with NCCL_MULTI_RANK_GPU_ENABLE=1)
#   mpirun_gpu     the same binaries' Mpi*Cuda* / Mpi*Gpu* cases under mpirun -np 2 on one GPU
#   nccl_train     moe train configs/tiny.yaml with parallel.backend=nccl, 2 ranks (when allowed)
#   bench_*        moe bench layer on the GPU: coarse, fine, Mixtral-like (bf16)
#   dense_gemm     the same per-expert GEMMs as one dense bf16 product (torch), for reference
#   quickstart     200 steps of configs/quickstart.yaml on the GPU
# Exit status: 0 when every step passed (skips allowed), 1 otherwise, 2 on bad usage.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: launch/gpu-check.sh OUTDIR" >&2; exit 2; }
OUTDIR="$1"; mkdir -p "$OUTDIR"; OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu-check.log"; : > "$LOG"
STEPS="$OUTDIR/.steps.jsonl"; : > "$STEPS"
BUILD_DIR="${BUILD_DIR:-$ROOT/build-gpu}"
BUNDLE="${BUNDLE:-$ROOT/.deps/gpu-bundle}"
PYTHON="${PYTHON:-python3}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
say() { echo "[gpu-check] $*" | tee -a "$LOG"; }

# record NAME STATUS SECONDS DETAIL [FIGURES_JSON]
record() {
  "$PYTHON" - "$@" >> "$STEPS" <<'PY'
import json, sys
name, status, secs, detail = sys.argv[1:5]
figs = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else None
print(json.dumps({"step": name, "status": status, "seconds": float(secs), "detail": detail, "figures": figs}))
PY
  say "step $1: $2 (${3}s) $4"
}

# step NAME TIMEOUT_S CMD...: runs CMD, output into the log and $OUTDIR/.NAME.out.
step() {
  local name="$1" limit="$2"; shift 2
  say "---- $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUTDIR/.$name.out" 2>&1
  local rc=$?
  cat "$OUTDIR/.$name.out" >> "$LOG"
  STEP_SECS=$((SECONDS - t0)); STEP_RC=$rc
  return $rc
}

# --- environment ---------------------------------------------------------------------
if [ -f "$BUNDLE/env.sh" ]; then
  # shellcheck disable=SC1091
  source "$BUNDLE/env.sh"; say "bundle: $BUNDLE ($(du -sh "$BUNDLE/root" | cut -f1))"
else
  say "no bundle at $BUNDLE: using what the system has"
fi
if [ -z "${MOE_CUDA_ROOT:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then MOE_CUDA_ROOT=/usr/local/cuda
  elif command -v nvcc >/dev/null; then MOE_CUDA_ROOT="$(dirname "$(dirname "$(command -v nvcc)")")"; fi
fi
ENV_JSON="$("$PYTHON" - <<'PY' 2>>"$LOG"
import json, torch, subprocess
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
try: d["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e: d["nccl"] = None
if d["gpus"]:
    p = torch.cuda.get_device_properties(0)
    d["gpu"] = p.name; d["gpu_mem_gib"] = round(p.total_memory / 2**30, 1)
try: d["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except Exception: pass
print(json.dumps(d))
PY
)"
[ -n "$ENV_JSON" ] || ENV_JSON='{"torch": null}'
say "environment: $ENV_JSON (CUDA toolkit: ${MOE_CUDA_ROOT:-none})"
NCCL_VER="$(echo "$ENV_JSON" | "$PYTHON" -c 'import json,sys; v=json.load(sys.stdin).get("nccl") or "0.0.0"; a=[int(x) for x in v.split(".")]; print(a[0]*10000+a[1]*100+a[2])')"
GPUS="$(echo "$ENV_JSON" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin).get("gpus") or 0)')"
TWO_RANKS_NCCL=0
if [ "$GPUS" -ge 2 ]; then TWO_RANKS_NCCL=1
elif [ "$NCCL_VER" -ge 23000 ]; then export NCCL_MULTI_RANK_GPU_ENABLE=1; TWO_RANKS_NCCL=1; fi
say "NCCL with 2 ranks: $([ $TWO_RANKS_NCCL = 1 ] && echo yes || echo "no (NCCL $NCCL_VER < 2.30 and $GPUS GPU)")"

# --- build -----------------------------------------------------------------------------
TORCH_PREFIX="$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null)"
SITE="$(dirname "$(dirname "$(dirname "$TORCH_PREFIX")")")"   # .../site-packages
LIBDIRS="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib; do [ -d "$d" ] && LIBDIRS="$LIBDIRS:$d"; done
[ -n "${MOE_CUDA_ROOT:-}" ] && LIBDIRS="$LIBDIRS:$MOE_CUDA_ROOT/lib64"
LDF="-Wl,-rpath-link,$LIBDIRS -Wl,-rpath,$LIBDIRS"
CMAKE_ARGS=(-DCMAKE_EXE_LINKER_FLAGS="$LDF" -DCMAKE_SHARED_LINKER_FLAGS="$LDF")
[ -n "${MOE_CUDA_ROOT:-}" ] && CMAKE_ARGS+=(-DMOE_CUDA_ROOT="$MOE_CUDA_ROOT")
[ -x "${OPAL_PREFIX:-/nonexistent}/bin/mpicxx" ] && CMAKE_ARGS+=(-DMPI_CXX_COMPILER="$OPAL_PREFIX/bin/mpicxx" -DMPIEXEC_EXECUTABLE="$OPAL_PREFIX/bin/mpirun")
if step build 3000 env TORCH_DIR="$TORCH_PREFIX" BUILD_DIR="$BUILD_DIR" JOBS="${JOBS:-$(nproc)}" \
     "$ROOT/launch/build.sh" "${CMAKE_ARGS[@]}"; then
  record build pass "$STEP_SECS" "$(grep '^\[build\]' "$OUTDIR/.build.out" | tr '\n' ' ')"
else
  record build fail "$STEP_SECS" "rc $STEP_RC: $(grep -E 'error|Error' "$OUTDIR/.build.out" | head -3 | tr '\n' ' ')"
fi
BIN="$BUILD_DIR/bin"
MOE="$BIN/moe"
MPIRUN="$(command -v mpirun || true)"

# gtest NAME BINARY FILTER [launcher...]: pass / skip (nothing ran) / fail
gtest_step() {
  local name="$1" bin="$2" filter="$3"; shift 3
  if [ ! -x "$bin" ]; then record "$name" fail 0 "$bin was not built"; return; fi
  if step "$name" 900 "$@" "$bin" --gtest_filter="$filter" --gtest_brief=0; then
    local ran skipped
    ran="$(grep -c '^\[       OK \]' "$OUTDIR/.$name.out")"
    skipped="$(grep -c '^\[  SKIPPED \]' "$OUTDIR/.$name.out")"
    if [ "$ran" -eq 0 ]; then record "$name" skip "$STEP_SECS" "no test ran ($skipped skipped): filter $filter"
    else record "$name" pass "$STEP_SECS" "$ran passed, $skipped skipped: $(grep '^\[  SKIPPED \]' "$OUTDIR/.$name.out" | head -3 | tr '\n' ' ')"; fi
  else
    record "$name" fail "$STEP_SECS" "rc $STEP_RC: $(grep -E '^\[  FAILED  \]|Failure|error' "$OUTDIR/.$name.out" | head -4 | tr '\n' ' ')"
  fi
}

# --- test suite: GPU cases -------------------------------------------------------------------
for t in unit_tests comm_tests moe_tests train_tests; do
  gtest_step "gpu_tests_$t" "$BIN/$t" '*Gpu*:*Cuda*:-Mpi*'
done
if [ -n "$MPIRUN" ]; then
  for t in comm_tests moe_tests train_tests; do
    gtest_step "mpirun_gpu_$t" "$BIN/$t" 'Mpi*Cuda*:Mpi*Gpu*' "$MPIRUN" -np 2 --bind-to none
  done
else
  record mpirun_gpu fail 0 "no mpirun (run launch/gpu-bundle.sh and carry .deps/gpu-bundle)"
fi

# --- NCCL end to end: moe train with parallel.backend=nccl on 2 ranks -------------------------
RUNS="$OUTDIR/.runs"; mkdir -p "$RUNS"
if [ "$TWO_RANKS_NCCL" = 1 ] && [ -n "$MPIRUN" ] && [ -x "$MOE" ]; then
  if step nccl_train 600 "$MPIRUN" -np 2 --bind-to none "$MOE" train "$ROOT/configs/tiny.yaml" \
       parallel.backend=nccl parallel.device=cuda train.steps=20 --out "$RUNS/nccl"; then
    record nccl_train pass "$STEP_SECS" "$(grep 'done: loss' "$OUTDIR/.nccl_train.out" | tail -1)"
  else record nccl_train fail "$STEP_SECS" "rc $STEP_RC: $(tail -3 "$OUTDIR/.nccl_train.out" | tr '\n' ' ')"; fi
else
  record nccl_train skip 0 "2 ranks on $GPUS GPU(s) need NCCL >= 2.30 (have $NCCL_VER), or no mpirun/moe"
fi

# --- moe bench layer on the GPU ----------------------------------------------------------------
bench_step() {  # NAME CONFIG overrides...
  local name="$1" cfg="$2"; shift 2
  if [ ! -x "$MOE" ]; then record "$name" fail 0 "moe was not built"; return 1; fi
  if step "$name" 900 "$MOE" bench layer "$cfg" parallel.device=cuda "$@" --json; then
    local fig; fig="$(sed -n '/^{/,$p' "$OUTDIR/.$name.out" | "$PYTHON" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' 2>/dev/null)"
    record "$name" pass "$STEP_SECS" "$*" "$fig"; return 0
  fi
  record "$name" fail "$STEP_SECS" "rc $STEP_RC: $(tail -2 "$OUTDIR/.$name.out" | tr '\n' ' ')"; return 1
}
bench_step bench_coarse "$ROOT/configs/bench/coarse.yaml"
bench_step bench_fine "$ROOT/configs/bench/fine.yaml"
# Mixtral-like: D 4096, H 14336, E 8, k 2, bf16; as many tokens as memory allows.
MIX_TOKENS=0
for tok in 32768 16384 8192 4096; do
  if bench_step "bench_mixtral_t$tok" "$ROOT/configs/bench/coarse.yaml" model.d_model=4096 model.heads=32 \
       moe.d_expert=14336 moe.experts=8 moe.top_k=2 bench.dtype=bfloat16 bench.tokens=$tok bench.warmup=2 bench.reps=5; then
    MIX_TOKENS=$tok; break
  fi
done

# --- dense bf16 GEMM reference: the per-expert SwiGLU products as plain matmuls ----------------
for shape in "coarse 4096 512 2048 8 2" "fine 4096 512 256 64 8" "mixtral ${MIX_TOKENS:-8192} 4096 14336 8 2"; do
  set -- $shape
  [ "$2" -gt 0 ] || set -- "$1" 8192 "$3" "$4" "$5" "$6"
  if step "dense_gemm_$1" 600 "$PYTHON" - "$2" "$3" "$4" "$5" "$6" <<'PY'
import json, sys, torch
T, D, H, E, k = map(int, sys.argv[1:6])
rows = max(1, T * k // E)                      # balanced rows per expert
dev = "cuda"
x = torch.randn(rows, D, device=dev, dtype=torch.bfloat16)
w1 = torch.randn(D, H, device=dev, dtype=torch.bfloat16); w3 = torch.randn(D, H, device=dev, dtype=torch.bfloat16)
w2 = torch.randn(H, D, device=dev, dtype=torch.bfloat16)
def expert():                                  # SwiGLU forward: 3 GEMMs
    h = torch.nn.functional.silu(x @ w1) * (x @ w3)
    return h @ w2
for _ in range(3): expert()
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
reps = 20
s.record()
for _ in range(reps):
    for _ in range(E): expert()
e.record(); torch.cuda.synchronize()
ms = s.elapsed_time(e) / reps                  # all E experts, forward
flops = E * 3 * 2 * rows * D * H
print(json.dumps({"T": T, "D": D, "H": H, "E": E, "k": k, "rows_per_expert": rows,
                  "forward_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                  "fwd_bwd_ms_estimate": round(3 * ms, 4)}))
PY
  then record "dense_gemm_$1" pass "$STEP_SECS" "T $2 D $3 H $4 E $5 k $6 bf16" "$(tail -1 "$OUTDIR/.dense_gemm_$1.out")"
  else record "dense_gemm_$1" fail "$STEP_SECS" "rc $STEP_RC: $(tail -2 "$OUTDIR/.dense_gemm_$1.out" | tr '\n' ' ')"; fi
done

# --- quickstart: 200 steps on the GPU ---------------------------------------------------------
if [ -x "$MOE" ]; then
  if step quickstart 1200 "$MOE" train "$ROOT/configs/quickstart.yaml" train.steps=200 parallel.device=cuda \
       --out "$RUNS/quickstart"; then
    TPS="$(sed -n 's/.*done: loss \([^ ]*\) -> \([^ ]*\) over \([0-9]*\) steps, \([0-9]*\) tokens\/s.*/{"loss_first": \1, "loss_last": \2, "steps": \3, "tokens_per_s": \4}/p' "$OUTDIR/.quickstart.out" | tail -1)"
    record quickstart pass "$STEP_SECS" "$(grep 'done: loss' "$OUTDIR/.quickstart.out" | tail -1)" "$TPS"
  else record quickstart fail "$STEP_SECS" "rc $STEP_RC: $(tail -3 "$OUTDIR/.quickstart.out" | tr '\n' ' ')"; fi
else
  record quickstart fail 0 "moe was not built"
fi

# --- report ----------------------------------------------------------------------------------------
"$PYTHON" - "$STEPS" "$OUTDIR/gpu-report.json" "$ENV_JSON" <<'PY'
import json, sys, time
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
failed = [s["step"] for s in steps if s["status"] == "fail"]
doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": json.loads(sys.argv[3]),
       "passed": not failed, "failed_steps": failed, "steps": steps}
json.dump(doc, open(sys.argv[2], "w"), indent=2)
print("[gpu-check] %d steps, %d failed%s" % (len(steps), len(failed), (": " + ", ".join(failed)) if failed else ""))
PY
rm -f "$OUTDIR"/.*.out "$STEPS"
say "report: $OUTDIR/gpu-report.json, log: $LOG"
grep -q '"passed": true' "$OUTDIR/gpu-report.json"
