#!/usr/bin/env bash
# Configures and builds into build/ (the program lands at build/bin/moe).
# Extra arguments go to cmake's configure step, e.g. -DMOE_SANITIZE=address.
# BUILD_DIR and BUILD_TYPE may be set in the environment; BUILD_TARGETS
# (space-separated) builds only those targets (the sanitizer stages of
# launch/test.sh build only the test binaries they run).
#
# Which LibTorch:
#   TORCH_DIR=...   a LibTorch to use: a torch package folder (site-packages/torch),
#                   its share/cmake, or an unpacked libtorch/ (CPU or CUDA);
#   otherwise the active python3's torch when it was built with CUDA
#                   (torch.utils.cmake_prefix_path; MOE_USE_PYTHON_TORCH=0 turns this off);
#   otherwise Debian's LibTorch 1.13 (CPU; what CI uses).
# The summary at the end says which one was used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}"
JOBS="${JOBS:-$(nproc)}"
GENERATOR=()
if command -v ninja >/dev/null && [ ! -f "$BUILD_DIR/Makefile" ]; then GENERATOR=(-G Ninja); fi
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_SLOPPINESS="pch_defines,time_macros,include_file_mtime,include_file_ctime"

# --- pick the LibTorch ---------------------------------------------------------
TORCH_ARGS=()
TORCH_CHOICE=""
torch_cmake_dir() {  # $1: a folder; prints the folder holding TorchConfig.cmake's parent (share/cmake)
  local d="$1"
  for c in "$d/share/cmake" "$d" "$d/.." "$d/../.."; do
    if [ -f "$c/Torch/TorchConfig.cmake" ]; then (cd "$c" && pwd); return 0; fi
  done
  return 1
}
if [ -n "${TORCH_DIR:-}" ]; then
  if ! PREFIX="$(torch_cmake_dir "$TORCH_DIR")"; then
    echo "[build] TORCH_DIR=$TORCH_DIR holds no Torch/TorchConfig.cmake (looked in share/cmake, ., .., ../..);" \
         "give a torch package folder, its share/cmake, or an unpacked libtorch/" >&2
    exit 2
  fi
  TORCH_ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX" -DTorch_DIR="$PREFIX/Torch")
  TORCH_CHOICE="TORCH_DIR: $PREFIX"
elif [ "${MOE_USE_PYTHON_TORCH:-1}" != 0 ] && command -v python3 >/dev/null &&
     PY_TORCH="$(python3 -c 'import torch, torch.utils
if torch.version.cuda: print(torch.utils.cmake_prefix_path + "|" + torch.__version__ + "|" + torch.version.cuda)' 2>/dev/null)" &&
     [ -n "$PY_TORCH" ]; then
  PREFIX="${PY_TORCH%%|*}"
  REST="${PY_TORCH#*|}"
  TORCH_ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX" -DTorch_DIR="$PREFIX/Torch")
  TORCH_CHOICE="python3's torch ${REST%%|*} with CUDA ${REST#*|}: $PREFIX"
else
  TORCH_CHOICE="Debian's LibTorch (system, CPU)"
  # A build folder configured earlier against another LibTorch keeps it in
  # its cache; point it back at the system one.
  if [ -f "$BUILD_DIR/CMakeCache.txt" ] && grep -q '^Torch_DIR:.*site-packages\|^Torch_DIR:.*\.deps' "$BUILD_DIR/CMakeCache.txt"; then
    for c in /usr/lib/*/cmake/Torch /usr/share/cmake/Torch /usr/lib/cmake/Torch; do
      if [ -f "$c/TorchConfig.cmake" ]; then TORCH_ARGS=(-DTorch_DIR="$c" -UCMAKE_PREFIX_PATH); break; fi
    done
  fi
fi

cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" "${TORCH_ARGS[@]}" "$@"
TARGET_ARGS=()
if [ -n "${BUILD_TARGETS:-}" ]; then read -r -a TARGET_ARGS <<<"$BUILD_TARGETS"; TARGET_ARGS=(--target "${TARGET_ARGS[@]}"); fi
cmake --build "$BUILD_DIR" -j "$JOBS" "${TARGET_ARGS[@]}"
cache_val() { sed -n "s/^$1:[A-Z]*=//p" "$BUILD_DIR/CMakeCache.txt" | head -1; }
echo "[build] LibTorch: $TORCH_CHOICE (Torch_DIR=$(cache_val Torch_DIR))"
if [ -f "$BUILD_DIR/moe-configure-summary.txt" ]; then
  grep -E '^  (LibTorch|C\+\+ standard|CUDA|MPI backend|NCCL backend)' "$BUILD_DIR/moe-configure-summary.txt" | sed 's/^ /[build]/'
fi
echo "[build] done: $BUILD_DIR/bin/moe"
