#!/usr/bin/env bash
# Build the peers bench/engine.py compares tandem with, from one llama.cpp source tree: the one
# vendored in llama-cpp-python's source distribution (the version pinned in pyproject's `bench`
# extra), so llama-cpp-python and llama-server run the same ggml.
#
#   bench/peers/build_llama_cpp.sh [DIR]      (DIR defaults to build/llama.cpp)
#
# Builds the shared libraries plus llama-server, llama-batched-bench, llama-bench and
# llama-perplexity with -march=native (as a user building llama.cpp on this machine would), then
# installs llama-cpp-python into .venv without compiling it again (LLAMA_BUILD=OFF): at run time
# it loads the libraries built here through LLAMA_CPP_LIB_PATH, which bench/engine.py sets.
# About 10 minutes on 2 cores; needs cmake and a C++ compiler, no network beyond PyPI.
set -euo pipefail
VERSION=0.3.36
DIR=$(realpath -m "${1:-build/llama.cpp}")
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$DIR"
if [ ! -d "$DIR/llama_cpp_python-$VERSION" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
  tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
SRC="$DIR/llama_cpp_python-$VERSION"
cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
cmake --build "$DIR/build" -j "$JOBS" --target llama-server llama-batched-bench llama-bench llama-perplexity
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q --no-deps "$SRC"
# llama-cpp-python's own Python dependencies (the model package was installed --no-deps)
"$PY" -m pip install -q "diskcache>=5.6.1" "typing-extensions>=4.5.0" "numpy>=1.20.0" "jinja2>=2.11.3"
echo "built: $DIR/build/bin (set LLAMA_CPP_LIB_PATH=$DIR/build/bin for llama_cpp)"
