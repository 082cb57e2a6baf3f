#!/usr/bin/env bash
# Compile check for GPU machines, run on a machine without a GPU: downloads
# the CUDA torch wheel that the GPU machines use (torch 2.11 + CUDA 13; the
# nearest CUDA-13 build when that one is not served) and the NVIDIA runtime
# wheels it links against into .deps/ (ignored by git), then configures,
# compiles and links the whole project (library, moe program, tests) with
# CUDA and NCCL against it in build-cuda/. Nothing is run.
#
#   launch/check-cuda-build.sh            # download (cached), configure, build
# Environment:
#   TORCH_SPEC     torch version to ask for first     (default 2.11.*)
#   CUDA_MAJOR     CUDA major version the wheel must use (default 13)
#   CUDA_ROOT      CUDA toolkit with nvcc, cudart and NCCL (default /usr/local/cuda)
#   DEPS_DIR       download cache                       (default .deps)
#   BUILD_DIR      build folder                         (default build-cuda)
#   JOBS           parallel compile jobs                (default nproc)
#   PYTHON         a python3 with pip                   (default python3)
# Exit status: 0 when everything compiled and linked, 2 when a download or
# the configure step failed, 1 when compiling or linking failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${TORCH_SPEC:-2.11.*}"
CUDA_MAJOR="${CUDA_MAJOR:-13}"
CUDA_ROOT="${CUDA_ROOT:-/usr/local/cuda}"
DEPS_DIR="${DEPS_DIR:-$ROOT/.deps}"
BUILD_DIR="${BUILD_DIR:-$ROOT/build-cuda}"
JOBS="${JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"
WHEELS="$DEPS_DIR/wheels"
SITE="$DEPS_DIR/cuda-torch/site-packages"   # unpacked like a venv's site-packages
PYVER="$("$PYTHON" -c 'import sys;print("%d.%d" % sys.version_info[:2])')"
PLATFORMS=()
for m in $(seq 17 28); do PLATFORMS+=(--platform "manylinux_2_${m}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
PIP=("$PYTHON" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" "${PLATFORMS[@]}" -d "$WHEELS")
log() { echo "[check-cuda-build] $*"; }
die() { echo "[check-cuda-build] error: $*" >&2; exit "${2:-2}"; }

[ -x "$CUDA_ROOT/bin/nvcc" ] || die "no nvcc under CUDA_ROOT=$CUDA_ROOT: install the CUDA toolkit $CUDA_MAJOR or set CUDA_ROOT"
[ -f "$CUDA_ROOT/include/nccl.h" ] || die "no nccl.h under $CUDA_ROOT/include: install NCCL for CUDA $CUDA_MAJOR (libnccl-dev) or set CUDA_ROOT"
mkdir -p "$WHEELS"

# --- 1. the torch wheel ----------------------------------------------------------
# The wheel's METADATA names the CUDA it was built with (cuda-toolkit==13.x or
# nvidia-*-cu13 requirements).
wheel_cuda_major() {  # $1: wheel -> prints the CUDA major version it requires, or nothing
  unzip -p "$1" '*.dist-info/METADATA' 2>/dev/null |
    sed -n -e 's/^Requires-Dist: cuda-toolkit.*==\([0-9]*\)\..*/\1/p' -e 's/^Requires-Dist: nvidia-[a-z-]*-cu\([0-9]*\)[ =;].*/\1/p' | head -1
}
find_torch_wheel() {  # prints the newest cached torch wheel built for CUDA_MAJOR
  local w
  for w in $(ls -t "$WHEELS"/torch-*.whl 2>/dev/null); do
    if [ "$(wheel_cuda_major "$w")" = "$CUDA_MAJOR" ]; then echo "$w"; return 0; fi
  done
  return 1
}
TORCH_WHEEL="$(find_torch_wheel || true)"
if [ -z "$TORCH_WHEEL" ]; then
  log "downloading torch==$TORCH_SPEC (CUDA $CUDA_MAJOR) from PyPI"
  "${PIP[@]}" --no-deps "torch==$TORCH_SPEC" || log "PyPI has no torch==$TORCH_SPEC wheel for python $PYVER"
  TORCH_WHEEL="$(find_torch_wheel || true)"
fi
INDEX="https://download.pytorch.org/whl/cu${CUDA_MAJOR}0"
if [ -z "$TORCH_WHEEL" ] && curl -fsS -m 15 -o /dev/null "$INDEX/torch/" 2>/dev/null; then
  log "trying the PyTorch index $INDEX"
  "${PIP[@]}" --no-deps --index-url "$INDEX" "torch==$TORCH_SPEC" || true
  TORCH_WHEEL="$(find_torch_wheel || true)"
fi
if [ -z "$TORCH_WHEEL" ]; then
  # The nearest CUDA-$CUDA_MAJOR build: the neighbouring minor releases.
  base="${TORCH_SPEC%%.\**}"; maj="${base%%.*}"; min="${base#*.}"; min="${min%%.*}"
  for d in 1 -1 2 -2; do
    cand="$maj.$((min + d)).*"
    log "no CUDA $CUDA_MAJOR torch==$TORCH_SPEC: trying torch==$cand"
    "${PIP[@]}" --no-deps "torch==$cand" || continue
    TORCH_WHEEL="$(find_torch_wheel || true)"
    [ -n "$TORCH_WHEEL" ] && break
  done
fi
[ -n "$TORCH_WHEEL" ] || die "found no torch wheel built for CUDA $CUDA_MAJOR (PyPI, $INDEX): set TORCH_SPEC or CUDA_MAJOR"
TORCH_VER="$(basename "$TORCH_WHEEL" | cut -d- -f2)"
log "torch wheel: $(basename "$TORCH_WHEEL") (CUDA $(wheel_cuda_major "$TORCH_WHEEL"))"

# --- 2. the NVIDIA runtime wheels it links against ------------------------------------
# Requires-Dist for Linux, minus the Python-only ones (triton, cuda-bindings).
mapfile -t REQS < <(unzip -p "$TORCH_WHEEL" '*.dist-info/METADATA' |
  sed -n 's/^Requires-Dist: \(.*\); *platform_system == "Linux".*/\1/p' | tr -d ' ' |
  grep -v -E '^(triton|cuda-bindings|cuda-python)([<>=!~\[]|$)' || true)
SUBST=()
for req in "${REQS[@]}"; do
  name="${req%%[<>=!~\[]*}"
  stamp="$WHEELS/.ok-$(echo "$req" | tr -c 'A-Za-z0-9.\n' '_')"
  [ -f "$stamp" ] && continue
  if "${PIP[@]}" "$req" >/dev/null 2>&1; then
    touch "$stamp"; continue
  fi
  # Not served for this platform at that exact version (PyPI lacks some pins
  # that only the PyTorch index carries): the nearest served release of the
  # same package links the same way (same soname).
  extras=""; [[ "$req" == *"["* ]] && extras="[${req#*[}" && extras="${extras%%]*}]"
  if "${PIP[@]}" "$name$extras" >/dev/null 2>&1; then
    SUBST+=("$req -> newest $name")
    touch "$stamp"
  else
    die "could not download $req (nor any $name) for python $PYVER, manylinux x86_64"
  fi
done
[ ${#SUBST[@]} -eq 0 ] || log "substituted (exact pin not served): ${SUBST[*]}"

# --- 3. unpack like a venv ------------------------------------------------------------
STAMP="$SITE/.unpacked-$TORCH_VER"
if [ ! -f "$STAMP" ]; then
  log "unpacking into $SITE"
  rm -rf "$SITE"; mkdir -p "$SITE"
  unzip -q -o "$TORCH_WHEEL" 'torch/lib/*' 'torch/include/*' 'torch/share/*' 'torch/version.py' -d "$SITE"
  for w in "$WHEELS"/nvidia_*.whl; do unzip -q -o "$w" 'nvidia/*' -d "$SITE"; done
  touch "$STAMP"
fi
TORCH_CMAKE="$SITE/torch/share/cmake"
[ -f "$TORCH_CMAKE/Torch/TorchConfig.cmake" ] || die "$TORCH_CMAKE/Torch/TorchConfig.cmake missing after unpacking $TORCH_WHEEL"
# The linker follows libtorch_cuda.so's dependencies (cuBLAS, cuDNN, NCCL, ...) into these folders.
LIBDIRS="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu*/lib; do [ -d "$d" ] && LIBDIRS="$LIBDIRS:$d"; done
LIBDIRS="$LIBDIRS:$CUDA_ROOT/lib64"
WHEEL_LDFLAGS="-Wl,-rpath-link,$LIBDIRS"

# --- 4. configure, compile, link --------------------------------------------------------
log "configuring $BUILD_DIR against LibTorch $TORCH_VER (CUDA toolkit $CUDA_ROOT)"
GENERATOR=(); mkdir -p "$BUILD_DIR"
if command -v ninja >/dev/null && [ ! -f "$BUILD_DIR/Makefile" ]; then GENERATOR=(-G Ninja); fi
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
if ! cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" -DTorch_DIR="$TORCH_CMAKE/Torch" \
      -DMOE_CUDA_ROOT="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" \
      -DCMAKE_EXE_LINKER_FLAGS="$WHEEL_LDFLAGS" -DCMAKE_SHARED_LINKER_FLAGS="$WHEEL_LDFLAGS" \
      -DMOE_ENABLE_NCCL=ON "$@" > "$BUILD_DIR/check-configure.log" 2>&1; then
  tail -40 "$BUILD_DIR/check-configure.log" >&2
  die "configure failed (full log: $BUILD_DIR/check-configure.log)"
fi
SUMMARY="$BUILD_DIR/moe-configure-summary.txt"
grep -q 'CUDA (LibTorch): ON' "$SUMMARY" || { cat "$SUMMARY" >&2; die "LibTorch $TORCH_VER was not detected as a CUDA build"; }
grep -q 'NCCL backend   : ON' "$SUMMARY" || { cat "$SUMMARY" >&2; die "the NCCL backend is off"; }
log "building (JOBS=$JOBS)"
KEEP_GOING=(); grep -q Ninja "$BUILD_DIR/CMakeCache.txt" && KEEP_GOING=(-- -k 0)   # list every failing file at once
if ! cmake --build "$BUILD_DIR" -j "$JOBS" "${KEEP_GOING[@]}" > "$BUILD_DIR/check-build.log" 2>&1; then
  grep -E -B2 -A12 'error|undefined reference' "$BUILD_DIR/check-build.log" | head -120 >&2
  die "compile or link failed (full log: $BUILD_DIR/check-build.log)" 1
fi
# What was linked: every executable, and that the program really depends on CUDA LibTorch and NCCL.
mapfile -t EXES < <(find "$BUILD_DIR/bin" -maxdepth 1 -type f -executable | sort)
NEEDED="$(readelf -d "$BUILD_DIR/bin/moe" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
for lib in libtorch_cuda.so libc10_cuda.so libnccl.so.2 libcudart.so.$CUDA_MAJOR; do
  [[ " $NEEDED " == *" $lib "* ]] || die "bin/moe does not link $lib (it needs: $NEEDED)" 1
done
grep -E '^  (LibTorch|C\+\+ standard|CUDA|MPI backend|NCCL backend)' "$SUMMARY" | sed 's/^ /[check-cuda-build]/'
log "linked ${#EXES[@]} executables: $(for e in "${EXES[@]}"; do printf '%s ' "$(basename "$e")"; done)"
log "bin/moe needs: $(echo "$NEEDED" | tr ' ' '\n' | grep -E 'torch|c10|nccl|cudart|mpi' | tr '\n' ' ')"
log "OK: the whole project compiles and links with CUDA and NCCL against LibTorch $TORCH_VER (nothing was run)"
