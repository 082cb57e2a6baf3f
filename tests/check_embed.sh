#!/usr/bin/env bash
# check_embed.sh BUILD_DIR SOURCE_DIR [cmake args...]: installs the build into
# BUILD_DIR/embed-install (emptied first), checks the installed `moe` runs,
# then builds examples/embed against that prefix alone (find_package(moe))
# and runs it: one MoELayer in a user's LibTorch loop on two thread ranks.
set -euo pipefail
build="$(cd "$1" && pwd)"; src="$(cd "$2" && pwd)"; shift 2
prefix="$build/embed-install"; ebuild="$build/embed-build"
rm -rf "$prefix" "$ebuild"
cmake --install "$build" --prefix "$prefix" >/dev/null
for f in bin/moe include/moe/moe/moe_layer.h; do
  [ -f "$prefix/$f" ] || { echo "check_embed: $prefix/$f was not installed"; exit 1; }
done
config="$(find "$prefix" -name moeConfig.cmake)"
[ -n "$config" ] || { echo "check_embed: no moeConfig.cmake under $prefix"; exit 1; }
"$prefix/bin/moe" --version
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S "$src/examples/embed" -B "$ebuild" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix" \
      "${launcher[@]}" "$@" >/dev/null
cmake --build "$ebuild"
"$ebuild/embed_moe"
