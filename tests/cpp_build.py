"""Where the C++ runtime (engines/cpp) is built for the tests, and the build itself (tools/build_cpp.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "engines" / "cpp" / "build"
INSTALL = BUILD / "install"
RSTR_RUN = INSTALL / "bin" / "rstr-run"


def missing() -> str | None:
    """Why the C++ runtime cannot be built here, or None."""
    tools = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if tools:
        return f"cannot build the C++ runtime: {', '.join(tools)} not found (apt-get install cmake g++)"
    have_headers = (ROOT / "third_party" / "onnxruntime" / "include" / "onnxruntime_cxx_api.h").is_file()
    if shutil.which("apt-get") is None and not have_headers:
        return "cannot fetch the ONNX Runtime headers without apt-get (Debian); see engines/cpp/README.md"
    return None


def build() -> Path:
    """Build and install the C++ project (incremental when engines/cpp/build exists); the rstr-run path."""
    env = {**os.environ, "PYTHON": sys.executable}  # link the onnxruntime that this Python runs
    proc = subprocess.run(["bash", str(ROOT / "tools" / "build_cpp.sh")], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"tools/build_cpp.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert RSTR_RUN.is_file()
    return RSTR_RUN
