#!/usr/bin/env bash
# Installs the Debian packages the framework needs; idempotent: only missing
# packages are installed, and nothing at all is done when every one is present.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  dpkg-dev file           # cpack -G DEB: dpkg-shlibdeps, file
  libtorch-dev            # tensors, autograd, optimizers (CPU LibTorch)
  libopenblas0-pthread    # without it LibTorch uses the reference BLAS: ~20x slower GEMMs
  libyaml-cpp-dev         # config files
  libcli11-dev            # command line
  nlohmann-json3-dev      # JSON output (metrics, bench --json)
  libgtest-dev googletest # tests
  libopenmpi-dev openmpi-bin  # MPI backend and mpirun tests
  fortunes                # default text corpus (byte-level LM data)
  python3-matplotlib      # plots written by the quickstart (via /usr/bin/python3)
  python3-torch           # tests: the independent Hugging Face Mixtral reference (tests/hf_mixtral_reference.py)
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "[install-deps] all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "[install-deps] missing packages: ${missing[*]}; run this script as root" >&2; exit 2
  fi
fi
echo "[install-deps] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "[install-deps] done"
