#!/usr/bin/env bash
# Prints the path of a llama-cpp-python wheel for this machine, building it once and caching it.
# llama-cpp-python has no wheel on PyPI for this version; its source build takes ~7 min on 2 cores.
#
# The build is portable: GGML_NATIVE=OFF with one CPU backend per x86-64 level (GGML_BACKEND_DL +
# GGML_CPU_ALL_VARIANTS: SSE4.2 ... AVX2 ... AVX-512 ... AMX), installed beside libllama, and
# coe registers the best one the CPU it runs on supports (coe.backends.llama_cpp). So a wheel built
# on one x86-64 machine is right on any other; the cache key is the recipe (this script, the
# compiler fix it force-includes, the compiler and the architecture), not the CPU.
#
# GGML_OPENMP=OFF: ggml runs its own thread pool. With OpenMP it shared torch's libgomp (same
# soname, loaded first), and once torch had run a 2-thread op on another thread (the router does
# at load) libgomp managed more threads than cores, throttled its spinning, and decoding on the
# engine thread ran 3x slower (smollm2: 35 vs 105 tok/s). Without that contention both are even.
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.36}"
pip="${PIP:-pip}"
here="$(cd "$(dirname "$0")" && pwd)"
fix="$here/gcc_amx_tile_fix.h"
cmake_args="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DGGML_OPENMP=OFF"
key=$( { echo "$version $cmake_args"; uname -m; cc --version 2>/dev/null | head -n1; cat "$0" "$fix"; } \
       | sha256sum | cut -c1-12)
dir="${COE_WHEEL_CACHE:-$HOME/.cache/coe/wheels}/llama-cpp-python-$version-portable-$key"
mkdir -p "$dir"
wheel=$(ls "$dir"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version from source into $dir (about 7 min on 2 cores, once per machine)" >&2
  tmp=$(mktemp -d)
  CMAKE_ARGS="$cmake_args -DCMAKE_CXX_FLAGS=-include\\ $fix" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$pip" wheel --no-deps --no-cache-dir -w "$tmp" "llama-cpp-python==$version" >&2  # pip's cache ignores CMAKE_ARGS
  mv "$tmp"/llama_cpp_python-*.whl "$dir"/
  rmdir "$tmp" 2>/dev/null || true
  wheel=$(ls "$dir"/llama_cpp_python-"$version"-*.whl | head -n1)
fi
echo "$wheel"
