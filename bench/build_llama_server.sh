#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp sources vendored in the llama-cpp-python
# release that requirements.txt pins, so that bench.py --llama-server compares both servers on the
# very same llama.cpp. Prints the binary's path on its last line.
#
#   bench/build_llama_server.sh [SOURCE] [CMAKE_ARG ...]
#
# SOURCE: the llama-cpp-python sdist (.tar.gz) or its unpacked folder; "" or absent downloads the
# pinned sdist from PyPI. Extra arguments go to cmake, for instance a CUDA build:
#   bench/build_llama_server.sh /tmp/llama_cpp_python-0.3.36 -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90
# BUILD_DIR (default bench/.llama-server) holds the build; a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(realpath -m "${BUILD_DIR:-bench/.llama-server}")
source=${1:-}
shift || true
version=$(sed -n 's/^llama-cpp-python==//p' requirements.txt)

mkdir -p "$build"
if [[ -z "$source" ]]; then
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$build"
    source="$build/llama_cpp_python-$version.tar.gz"
fi
if [[ -f "$source" ]]; then
    tar -xzf "$source" -C "$build"
    source="$build/llama_cpp_python-$version"
fi
llama="$source/vendor/llama.cpp"
[[ -f "$llama/CMakeLists.txt" ]] || { echo "no llama.cpp sources under $llama" >&2; exit 2; }

# As llama-cpp-python builds it (no curl, Release, the native CPU features), but one static binary.
cmake -S "$llama" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    "$@" >"$build/cmake.log"
cmake --build "$build/cmake" --target llama-server -j "$(nproc)" >"$build/build.log"
echo "$build/cmake/bin/llama-server"
