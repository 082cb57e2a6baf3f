#!/usr/bin/env bash
# Gathers, on this (Debian 12) machine, what a GPU machine without a package
# registry lacks to build and run the project: yaml-cpp, CLI11, nlohmann-json,
# GoogleTest and Open MPI with their runtime libraries. `apt-get download` +
# `dpkg-deb -x` into .deps/gpu-bundle/root (ignored by git), pruned to
# headers, CMake configs, libraries, Open MPI's programs, plugins and help
# files, so it is small enough to carry. launch/gpu-check.sh uses it.
#
#   launch/gpu-bundle.sh            # prints the bundle's size at the end
# Environment: BUNDLE (default .deps/gpu-bundle).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${BUNDLE:-$ROOT/.deps/gpu-bundle}"
log() { echo "[gpu-bundle] $*"; }
die() { echo "[gpu-bundle] error: $*" >&2; exit 2; }
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian)"

# What the build needs, and Open MPI's runtime libraries (the Depends of
# libopenmpi3, libpmix2, libfabric1, libucx0 and libibverbs1, minus what any
# machine with CUDA and Python has: libc, libstdc++, zlib, libudev, ssh).
# An explicit list: the recursive closure drags in compilers (flang, LLVM).
PKGS=(libyaml-cpp-dev libyaml-cpp0.7 libcli11-dev nlohmann-json3-dev libgtest-dev
      libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common
      libpmix2 libevent-core-2.1-7 libevent-pthreads-2.1-7 libhwloc15 libhwloc-plugins
      libfabric1 libucx0 libibverbs1 libnl-3-200 libnl-route-3-200 librdmacm1
      libpsm2-2 libpsm-infinipath1 libnuma1 libmunge2 libltdl7)
mkdir -p "$BUNDLE/debs"
for p in "${PKGS[@]}"; do
  apt-cache show "$p" >/dev/null 2>&1 || die "apt-cache does not know $p: run apt-get update"
done
log "${#PKGS[@]} packages: ${PKGS[*]}"
( cd "$BUNDLE/debs" && for p in "${PKGS[@]}"; do
    ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
    ls "${p}"_*.deb >/dev/null 2>&1 || die "apt-get download $p failed"
  done )

rm -rf "$BUNDLE/root"; mkdir -p "$BUNDLE/root"
for p in "${PKGS[@]}"; do dpkg-deb -x "$(ls "$BUNDLE"/debs/"${p}"_*.deb | head -1)" "$BUNDLE/root"; done
R="$BUNDLE/root"
# Prune: documentation, man pages, locales, lintian, Fortran and Java bits,
# Open MPI's unused compiler wrappers and static libraries (except GoogleTest's).
rm -rf "$R"/usr/share/{doc,man,info,locale,lintian,bug,gdb} "$R"/usr/share/openmpi/amca-param-sets \
       "$R"/usr/lib/x86_64-linux-gnu/openmpi/lib/*.mod "$R"/usr/lib/x86_64-linux-gnu/openmpi/lib/*f08* \
       "$R"/usr/lib/x86_64-linux-gnu/openmpi/lib/*usempi* "$R"/usr/lib/x86_64-linux-gnu/openmpi/lib/*mpifh* \
       "$R"/usr/lib/x86_64-linux-gnu/openmpi/lib/*java* "$R"/usr/lib/x86_64-linux-gnu/openmpi/include/*.mod \
       "$R"/usr/lib/x86_64-linux-gnu/fortran "$R"/usr/src "$R"/etc/alternatives 2>/dev/null || true
find "$R" -name '*.a' ! -name 'libgtest*.a' ! -name 'libgmock*.a' -delete
find "$R" -xtype l -delete 2>/dev/null || true   # links into pruned parts
# Debian reaches its Open MPI programs through /etc/alternatives, which
# dpkg-deb -x does not create: make the names gpu-check.sh uses.
B="$R/usr/bin"
for n in mpirun mpiexec; do [ -e "$B/$n.openmpi" ] && ln -sf "$n.openmpi" "$B/$n"; done
for n in mpicxx mpicc mpic++; do [ -e "$B/$n.openmpi" ] && ln -sf "$n.openmpi" "$B/$n"; done
[ -x "$B/mpirun" ] || die "no mpirun in the bundle (openmpi-bin not unpacked?)"
cat > "$BUNDLE/env.sh" <<'EOF'
# Sourced by launch/gpu-check.sh: the bundle as an install prefix.
GPU_BUNDLE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/root" && pwd)"
export OPAL_PREFIX="$GPU_BUNDLE_ROOT/usr"          # Open MPI, relocated
export PATH="$GPU_BUNDLE_ROOT/usr/bin:$PATH"
export LD_LIBRARY_PATH="$GPU_BUNDLE_ROOT/usr/lib/x86_64-linux-gnu:$GPU_BUNDLE_ROOT/usr/lib/x86_64-linux-gnu/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CMAKE_PREFIX_PATH="$GPU_BUNDLE_ROOT/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export OMPI_MCA_plm_rsh_agent=false                # one node: no ssh needed
EOF
log "${#PKGS[@]} packages unpacked and pruned into $R"
log "size: $(du -sh "$R" | cut -f1) (carry .deps/gpu-bundle/root and .deps/gpu-bundle/env.sh; the .debs stay here)"
