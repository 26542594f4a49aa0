#!/usr/bin/env bash
# Builds llama.cpp's C++ server (llama-server) once, from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist on PyPI, into a cache outside the checkout; prints the binary's path.
#
# Why: llama-cpp-python's Python server takes only text prompts, while real llama.cpp deployments run
# llama-server, which takes token-id prompts, renders chat templates (/apply-template) and reports
# prefix-cache hits. The tests run against the real thing. A new machine pays the build once (minutes).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${MARKOV_RSA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/markov-rsa-tools}"
DEST="$CACHE/llama-server-$VERSION"
BIN="$DEST/llama-server"
PIP="${PIP:-pip}"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { echo "building llama-server needs cmake (apt-get install cmake)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server $VERSION once into $DEST (a few minutes)" >&2
"$PIP" download -q --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >/dev/null
mkdir -p "$DEST"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
