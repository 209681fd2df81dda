"""``tools/bench.py --quick`` runs end to end on the reference model and writes its table.

A smoke test only: benchmarks are never timed assertions.  It checks that every row runs,
that the report and results.json are written, and that the bundle rows reproduce the PyTorch
rows' quality (same noise, same arithmetic).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rstr.families import REFERENCE_MODEL

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIT = importlib.util.find_spec("cache_dit") is not None  # optional: `pip install cache-dit`


@pytest.mark.skipif(not (REFERENCE_MODEL / "transformer").is_dir(), reason="the reference model is not trained yet")
def test_bench_quick_writes_table(tmp_path):
    out = tmp_path / "bench.md"
    # One bundle (the rstr schedule) rather than two keeps the run near a minute on two cores.
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench.py"),
        "--quick",
        "--models",
        "ref",
        "--reps",
        "1",
        "--threads",
        "1",
        "--rows",
        "diffusers,cache-dit@0.32,rstr-torch,ort-rstr,ort-rstr-int8-dynamic,ort-rstr-bf16,trt-rstr",
        "--quality-num",
        "20",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    text = out.read_text()
    for row in ("diffusers", "rstr-torch", "ort-rstr", "ort-rstr-int8-dynamic", *(("cache-dit@0.32",) if CACHE_DIT else ())):
        assert f"| **{row}** |" in text, f"row {row} missing from the table"
    assert "trt-rstr" in text  # listed as not run, with the reason, on a machine without TensorRT
    assert "**ort-rstr-bf16**: not run: ONNX Runtime's CPU provider has no bf16" in text
    assert (tmp_path / "bench" / "e2e.png").is_file()

    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    ref = results["models"]["ref"]
    assert ref["rows"]["ort-rstr"]["e2e"]["1"]["n"] == 1
    assert ref["rows"]["ort-rstr"]["passes_per_image"] == ref["schedules"]["rstr"]["passes"]
    q = ref["quality"]["rows"]
    assert q["ort-rstr"]["fd_mean"] == pytest.approx(q["rstr-torch"]["fd_mean"], rel=1e-3)
    # the int8 bundle is a different graph: verified to its own tolerance, its FD measured beside the others
    assert ref["rows"]["ort-rstr-int8-dynamic"]["precision"] == "int8-dynamic"
    assert 0 < ref["bundle_rel_error"]["rstr-int8-dynamic@1"] <= 5e-2
    assert q["ort-rstr-int8-dynamic"]["fd_mean"] > 0
    if CACHE_DIT:  # configured to fit the 4-block model, it runs and caches (stats from its FLOP-counted run)
        assert ref["rows"]["cache-dit@0.32"]["cache_dit_stats"]["cached_steps"] >= 1
        assert q["cache-dit@0.32"]["fd_mean"] > 0
