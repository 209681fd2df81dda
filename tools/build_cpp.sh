#!/usr/bin/env bash
# One-command build of the C++ runtime (engines/cpp): fetch ONNX Runtime headers + library and
# the Debian build dependencies (tools/get_onnxruntime_cpp.sh), then configure, build and
# install into engines/cpp/build/ (build tree) and engines/cpp/build/install/ (prefix).
#   tools/build_cpp.sh                     # Release build, rstr-run in engines/cpp/build/install/bin
#   tools/build_cpp.sh -DRSTR_WITH_CUDA=ON  # extra arguments go to the CMake configure step
# Environment: JOBS (default 2), BUILD_DIR, PYTHON (see get_onnxruntime_cpp.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/engines/cpp"
BUILD_DIR="${BUILD_DIR:-$SRC/build}"
JOBS="${JOBS:-2}"

command -v cmake >/dev/null || { echo "build_cpp: error: cmake not found (apt-get install cmake)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "build_cpp: error: no C++ compiler (apt-get install g++)" >&2; exit 1; }

"$ROOT/tools/get_onnxruntime_cpp.sh"
cmake -S "$SRC" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
  -DONNXRUNTIME_ROOT="$ROOT/third_party/onnxruntime" -DCMAKE_INSTALL_PREFIX="$BUILD_DIR/install" "$@"
cmake --build "$BUILD_DIR" -j "$JOBS"
cmake --install "$BUILD_DIR"
echo "build_cpp: rstr-run is $BUILD_DIR/install/bin/rstr-run"
