#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest
# (unit tests, thread-backend multi-rank tests and mpirun tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install-deps.sh"
"$ROOT/launch/build.sh"
cd "${BUILD_DIR:-$ROOT/build}"
# Open MPI refuses to run as root without these; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
ctest --output-on-failure -j "${CTEST_JOBS:-2}" "$@"
