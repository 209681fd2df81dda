#!/usr/bin/env bash
# Fetch what the C++ runtime (engines/cpp) needs to build on a Debian machine:
#   - ONNX Runtime C/C++ headers from Debian trixie's libonnxruntime-dev, downloaded with
#     `apt-get download` under a temporary sources list and unpacked with `dpkg -x`
#     (the machine's own apt configuration is not touched);
#   - the ONNX Runtime shared library from the onnxruntime wheel installed in the Python
#     environment (the C API is versioned: the 1.21 headers run on a newer library);
#   - nlohmann-json3-dev, libssl-dev and libpng-dev through apt-get, when missing.
# Result: third_party/onnxruntime/{include,lib} (git-ignored), usable as -DONNXRUNTIME_ROOT.
# Idempotent: a second run finds everything in place and only prints it.
#
# Environment: PYTHON selects the Python whose onnxruntime wheel provides the library
# (default: the first of python3 on PATH and /work/venv/bin/python that imports onnxruntime).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/third_party/onnxruntime"

say() { echo "get_onnxruntime_cpp: $*"; }
die() { echo "get_onnxruntime_cpp: error: $*" >&2; exit 1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (install it yourself, or run this script as root)"; fi
}

# 1. Debian build dependencies.
missing=()
for pkg in nlohmann-json3-dev libssl-dev libpng-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them with your package manager"
  say "installing ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# 2. Headers.
if [[ -f "$DEST/include/onnxruntime_cxx_api.h" ]]; then
  say "headers already in $DEST/include"
else
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "need apt-get and dpkg to fetch the headers; \
or download an official ONNX Runtime release and pass -DONNXRUNTIME_ROOT=/path/to/onnxruntime-linux-x64-1.xx"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -f "$keyring" ]] || die "$keyring not found (package debian-archive-keyring)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/pkg"
  cat > "$tmp/trixie.sources" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Architectures: amd64
Signed-By: $keyring
SOURCES
  apt_opts=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$tmp" -o "Dir::State::Lists=$tmp/lists"
            -o "Dir::Cache=$tmp/cache" -o "APT::Architecture=amd64" -o "APT::Architectures=amd64")
  say "downloading libonnxruntime-dev from Debian trixie"
  apt-get "${apt_opts[@]}" update -q >"$tmp/update.log" 2>&1 || { cat "$tmp/update.log" >&2; die "apt-get update for trixie failed"; }
  (cd "$tmp/pkg" && apt-get "${apt_opts[@]}" download libonnxruntime-dev) || die "apt-get download libonnxruntime-dev failed"
  dpkg -x "$tmp"/pkg/libonnxruntime-dev_*.deb "$tmp/root"
  hdr="$(dirname "$(find "$tmp/root" -name onnxruntime_cxx_api.h | head -n1)")"
  [[ -f "$hdr/onnxruntime_cxx_api.h" ]] || die "onnxruntime_cxx_api.h not found in libonnxruntime-dev"
  mkdir -p "$DEST/include"
  cp -a "$hdr"/. "$DEST/include/"
  say "headers ($(basename "$tmp"/pkg/libonnxruntime-dev_*.deb)) in $DEST/include"
fi

# 3. Library from the onnxruntime wheel.
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3 /work/venv/bin/python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import onnxruntime" 2>/dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
[[ -n "${PYTHON:-}" ]] || die "no Python with onnxruntime found: pip install onnxruntime, or set PYTHON=/path/to/python"
capi="$("$PYTHON" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')" \
  || die "$PYTHON cannot import onnxruntime (pip install onnxruntime)"
lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)"
[[ -n "$lib" ]] || die "no libonnxruntime.so.1.* in $capi"
mkdir -p "$DEST/lib"
name="$(basename "$lib")"                        # libonnxruntime.so.1.32.0
soname="$(echo "$name" | sed -E 's/^(libonnxruntime\.so\.[0-9]+)\..*$/\1/')"   # libonnxruntime.so.1
ln -sfn "$lib" "$DEST/lib/$name"
ln -sfn "$name" "$DEST/lib/$soname"
ln -sfn "$soname" "$DEST/lib/libonnxruntime.so"
# Execution-provider plug-ins (CUDA, TensorRT in onnxruntime-gpu) are loaded from the
# directory of libonnxruntime.so, so they are linked beside it.
for provider in "$capi"/libonnxruntime_providers_*.so; do
  if [[ -e "$provider" ]]; then ln -sfn "$provider" "$DEST/lib/$(basename "$provider")"; fi
done
say "library $name (from $capi) in $DEST/lib"
