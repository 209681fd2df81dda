"""TensorRT backend, the runners: ONNX Runtime and the fallback everywhere; engines and the runner where TensorRT and a GPU are.

The bundle is tests/handmade_bundle.py's (docs/bundle.md, made by hand): ONNX Runtime must match
its numpy walk of the plan, the TensorRT runner must refuse in one line (and ``auto`` fall back)
where it cannot start, and with TensorRT and a GPU its engines must match ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from handmade_bundle import MIXED, NUM_CLASSES, C, H, W, make_bundle, reference_walk, write_manifest
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import Manifest
from rstr.engines.tensorrt.plan import graphs_needed

from rstr.errors import BackendUnavailable


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _inputs(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, C, H, W), dtype=np.float32), rng.integers(0, NUM_CLASSES, batch).astype(np.int64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundle"), batch=2)


# ----------------------------------------------------------------------------- the hand-made bundle
def test_handmade_bundle_matches_the_reference_walk(bundle):
    from rstr.engines.onnxruntime import OnnxRuntimeRunner

    noise, labels = _inputs(bundle.batch, 0)
    with OnnxRuntimeRunner(bundle) as runner:
        got = runner.infer(noise, {"class_labels": labels})
    np.testing.assert_allclose(got, reference_walk(bundle.manifest, noise, labels), rtol=1e-5, atol=1e-5)


def test_runner_unavailable_is_one_line(bundle):
    from rstr.engines.tensorrt import TensorRTRunner

    # This bundle has no engines, so the runner cannot start anywhere; which reason comes first
    # depends on the machine (TensorRT, cuda-python, a GPU, then the engines).
    with pytest.raises(BackendUnavailable) as err:
        TensorRTRunner(bundle)
    assert str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(_has("tensorrt"), reason="TensorRT is installed here")
def test_runner_says_tensorrt_is_missing(bundle):
    from rstr.engines.tensorrt import TensorRTRunner

    with pytest.raises(BackendUnavailable, match=r"^TensorRT is not installed \(pip install 'rstr\[tensorrt\]'"):
        TensorRTRunner(bundle)


def test_auto_falls_back_to_onnxruntime_and_tensorrt_raises(bundle, caplog):
    from rstr.engines.onnxruntime import OnnxRuntimeRunner
    from rstr.engines.pipeline import make_runner

    with caplog.at_level(logging.WARNING, logger="rstr"):
        runner = make_runner(bundle, "auto")
    assert isinstance(runner, OnnxRuntimeRunner)
    (record,) = [r for r in caplog.records if r.name == "rstr"]
    assert re.fullmatch(r"TensorRT not used \(.+\); falling back to ONNX Runtime \((cpu|cuda)\)", record.getMessage())
    with pytest.raises(BackendUnavailable):
        make_runner(bundle, "tensorrt")


# ----------------------------------------------------------------------------- GPU, cuda-python only
@pytest.mark.gpu
def test_cuda_helper_copies_and_replays_a_captured_graph():
    """The CUDA calls the runner makes (no TensorRT): buffers, copies, capture and replay."""
    if not (_has("cuda.bindings") or _has("cuda.cudart")):
        pytest.skip("cuda-python is not installed (pip install 'rstr[tensorrt]')")
    from rstr.engines.tensorrt.cuda import Cuda, gpu

    cuda, name, cc = gpu(0)
    assert name and cc.count(".") == 1
    cuda.set_device(0)
    stream = cuda.stream()
    a, b, rec = np.arange(64, dtype=np.float32), np.zeros(64, np.float32), np.zeros(64, np.float32)
    pa, pb, table = cuda.malloc(a.nbytes), cuda.malloc(a.nbytes), cuda.malloc(3 * a.nbytes)
    try:
        cuda.h2d(table, np.stack([a, 2 * a, 3 * a]), stream)
        cuda.begin_capture(stream)
        cuda.d2d(pb, pa, a.nbytes, stream)  # what the graph bakes in: pa -> pb
        graph = cuda.end_capture(stream)
        exec_ = cuda.instantiate(graph)
        cuda.graph_destroy(graph)
        for i in range(3):  # per "step": a record into the fixed buffer, then replay
            cuda.d2d(pa, table + i * a.nbytes, a.nbytes, stream)
            cuda.launch(exec_, stream)
            cuda.d2h(b, pb, stream)
            cuda.sync(stream)
            np.testing.assert_array_equal(b, (i + 1) * a)
        cuda.memset(pb, b.nbytes, stream)
        cuda.d2h(rec, pb, stream)
        cuda.sync(stream)
        assert not rec.any()
        cuda.exec_destroy(exec_)
    finally:
        for p in (pa, pb, table):
            cuda.free(p)
        cuda.stream_destroy(stream)
    assert isinstance(cuda, Cuda)


# ----------------------------------------------------------------------------- TensorRT + GPU
def _with_engines(tmp_path: Path, batch: int, guided, **build) -> Bundle:
    from rstr.engines.tensorrt import build_engines

    root = tmp_path / "bundle"
    make_bundle(root, batch, guided)
    manifest = json.loads((root / "manifest.json").read_text())
    engines = build_engines(root, Manifest.from_json(manifest), timing_cache=tmp_path / "timing.cache", **build)
    manifest["engines"] = [e.to_json() for e in engines]
    write_manifest(root, manifest)
    return Bundle.open(root)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("batch, guided", [(1, MIXED), (2, MIXED), (2, (True, True, True)), (1, (False, False))])
def test_tensorrt_matches_onnxruntime(tmp_path, batch, guided):
    from rstr.engines.onnxruntime import OnnxRuntimeRunner
    from rstr.engines.tensorrt import TensorRTRunner

    bundle = _with_engines(tmp_path, batch, guided)
    entries = {e.graph: e for e in bundle.engines_for("tensorrt")}
    assert sorted(entries) == graphs_needed(bundle.plan)
    assert (tmp_path / "timing.cache").is_file()
    assert [p["batch"] for p in entries["denoiser"].profiles] == bundle.plan.denoiser_rows
    inputs = [_inputs(batch, seed) for seed in (0, 1)]
    with OnnxRuntimeRunner(bundle) as ort:
        want = [ort.infer(n, {"class_labels": lab}) for n, lab in inputs]
    for graphs in (True, False):
        with TensorRTRunner(bundle, cuda_graphs=graphs) as runner:
            assert runner.describe()["cuda_graphs"] is graphs
            for (noise, labels), ref in zip(inputs, want):  # twice: replays read fresh inputs
                trace = []
                got = runner.infer(noise, {"class_labels": labels}, trace=trace)
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
                assert len(trace) == len(guided)
                np.testing.assert_array_equal(trace[-1], got)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_refuses_engines_for_another_gpu(tmp_path):
    from rstr.engines.tensorrt import TensorRTRunner

    bundle = _with_engines(tmp_path, 1, MIXED, optimization_level=0)
    manifest = bundle.manifest.to_json()
    for e in manifest["engines"]:
        e["compute_capability"] = "5.0"
    write_manifest(bundle.root, manifest)
    with pytest.raises(BackendUnavailable, match="on compute capability 5.0; this machine has TensorRT"):
        TensorRTRunner(Bundle.open(bundle.root))


# ------------------------------------------------------------------- host code in engines: opt-in
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_runner_refuses_version_compatible_engines_unless_trusted(tmp_path):
    from rstr.engines.tensorrt import TensorRTRunner

    bundle = _with_engines(tmp_path, 1, MIXED, version_compatible=True)
    with pytest.raises(BackendUnavailable, match="is version-compatible"):
        TensorRTRunner(bundle)
    with TensorRTRunner(bundle, trust_engine_host_code=True) as runner:
        noise, labels = _inputs(1, 0)
        assert runner.infer(noise, {"class_labels": labels}).shape == noise.shape
