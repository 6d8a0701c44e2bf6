#!/usr/bin/env bash
# Prints the path of a llama-cpp-python wheel built for this CPU, building it once per machine.
# llama-cpp-python has no wheel on PyPI for this version; its source build takes ~8 min on 2 cores.
# The wheel is tuned for this CPU (-march=native), so the cache key is a hash of the CPU flags.
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.36}"
pip="${PIP:-pip}"
key=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)
dir="${COE_WHEEL_CACHE:-$HOME/.cache/coe/wheels}/llama-cpp-python-$version-$key"
mkdir -p "$dir"
wheel=$(ls "$dir"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version from source into $dir (about 8 min on 2 cores, once per machine)" >&2
  tmp=$(mktemp -d)
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$pip" wheel --no-deps -w "$tmp" "llama-cpp-python==$version" >&2
  mv "$tmp"/llama_cpp_python-*.whl "$dir"/
  rmdir "$tmp" 2>/dev/null || true
  wheel=$(ls "$dir"/llama_cpp_python-"$version"-*.whl | head -n1)
fi
echo "$wheel"
