#!/usr/bin/env bash
# Builds llama.cpp's C++ server (llama-server) once, from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist on PyPI, into a cache outside the checkout; prints the binary's path.
#
# Why: llama-cpp-python's Python server takes only text prompts, while real llama.cpp deployments run
# llama-server, which takes token-id prompts, renders chat templates (/apply-template) and reports
# prefix-cache hits. The tests run against the real thing. A new machine pays the build once (minutes).
#
# Why portable: a native build (-march=native) compiles in whatever the build machine's CPU offers
# (AVX-512, AMX, repacked-weight kernels), and llama.cpp's code for those crashes on some of the
# virtualised CPUs CI runs on. The build targets one baseline every x86-64 CI machine has (x86-64-v3:
# AVX2, FMA, F16C, BMI2; on other architectures the compiler's generic target), with AVX-512 and AMX
# off, and the tests also start the server with weight repacking off. The cache key is a digest of
# everything that changes the binary, so a changed flag never reuses an old build.
# MARKOV_RSA_LLAMA_NATIVE=1 builds the native variant instead (to reproduce a CPU-specific crash).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${MARKOV_RSA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/markov-rsa-tools}"
PIP="${PIP:-pip}"
ARCH="$(uname -m)"

FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON)
if [ "${MARKOV_RSA_LLAMA_NATIVE:-0}" = 1 ]; then
  FLAGS+=(-DGGML_NATIVE=ON)
else
  FLAGS+=(-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF)
  if [ "$ARCH" = x86_64 ]; then
    FLAGS+=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
            -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
            -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  fi
fi
KEY="$(printf '%s\n' "$VERSION" "$ARCH" "${FLAGS[@]}" | sha256sum | cut -c1-12)"
DEST="$CACHE/llama-server-$VERSION-$KEY"
BIN="$DEST/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { echo "building llama-server needs cmake (apt-get install cmake)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server $VERSION once into $DEST (a few minutes)" >&2
"$PIP" download -q --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" "${FLAGS[@]}" >"$WORK/configure.log" 2>&1 || { tail -n 30 "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$DEST"
printf '%s\n' "${FLAGS[@]}" >"$DEST/flags.txt"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
