"""Reduced precision after export: which layers, int8 (dynamic, static) and bf16 graphs, the gate's decisions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from rstr.engines.bundle import Bundle
from rstr.engines.onnxruntime import OnnxRuntimeRunner
from rstr.export import stages
from rstr.export.build import BuildOptions, build
from rstr.export.precision import calibration_feeds, emulate_bf16, reduced_linears, select_nodes, weighted_nodes
from rstr.export.precision_gate import PrecisionRecord, _decide
from rstr.export.verify import PRECISION_TOLERANCE, verify
from test_export import MAKERS, save_model, sparse_schedule

from rstr.compare import Comparison, Side
from rstr.errors import BackendUnavailable, RstrError
from rstr.families import REFERENCE_MODEL, load_model
from rstr.schedule import GuidanceSchedule


@pytest.fixture(scope="module")
def tiny_dit_model(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("precision")
    family = MAKERS["dit"]()
    return save_model(family, tmp / "model"), sparse_schedule(family, tmp / "s.json")


def _build(model_schedule, tmp_path: Path, precision: str) -> Bundle:
    model, schedule = model_schedule
    build(BuildOptions(model=model, schedule=schedule, out=tmp_path / precision, measure=False, precision=precision))
    return Bundle.open(tmp_path / precision)


def _ops(bundle: Bundle) -> set[str]:
    return {n.op_type for n in onnx.load(str(bundle.graph_path("denoiser"))).graph.node}


def test_block_linears_are_reduced_and_norms_embeddings_final_layer_kept():
    family = MAKERS["dit"]()
    chosen = reduced_linears(family)
    for i in range(2):
        for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
            assert f"transformer_blocks.{i}.{layer}" in chosen
    kept = [n for n in chosen if ".norm" in n or "emb" in n or n.startswith("proj_out")]
    assert kept == []
    assert len(chosen) == 12


@pytest.mark.parametrize("name", ["dit", "pixart"])  # the dynamo and the TorchScript exporter
def test_every_reduced_linear_is_found_in_the_graph_by_its_weight(tmp_path, name):
    from rstr.export.graphs import export_denoiser

    family = MAKERS[name]()
    export_denoiser(family, tmp_path / "d.onnx")
    model = onnx.load(str(tmp_path / "d.onnx"))
    owners = weighted_nodes(model, family)
    assert reduced_linears(family) <= set(owners.values())
    assert len(select_nodes(model, family)) == len(reduced_linears(family))


def test_int8_dynamic_bundle_verifies_and_differs_from_fp32(tiny_dit_model, tmp_path):
    fp32 = _build(tiny_dit_model, tmp_path, "fp32")
    int8 = _build(tiny_dit_model, tmp_path, "int8-dynamic")
    assert int8.manifest.precision == "int8-dynamic" and fp32.manifest.precision == "fp32"
    assert "MatMulInteger" in _ops(int8) or "DynamicQuantizeMatMul" in _ops(int8)
    v = int8.manifest.verification
    assert v.tolerance == PRECISION_TOLERANCE["int8-dynamic"] and 0 < v.max_rel_error <= v.tolerance
    gate = int8.manifest.summary["gates"]["precision"]
    assert gate["shipped"] == "int8-dynamic" and gate["conversion"]["reduced_layers"] == 12
    # the quantized graph really computes something else than the fp32 one
    noise = np.random.default_rng(0).standard_normal(fp32.sample.concrete(1), dtype=np.float32)
    cond = {"class_labels": np.array([3])}
    with OnnxRuntimeRunner(fp32) as a, OnnxRuntimeRunner(int8) as b:
        assert not np.allclose(a.infer(noise, cond), b.infer(noise, cond), atol=1e-6)


def test_a_wrong_int8_graph_fails_verification(tiny_dit_model, tmp_path):
    """The int8 tolerance still catches a broken graph: one quantized layer's weight scales (the last block's
    MLP output, by initializer order) off by 3x."""
    int8 = _build(tiny_dit_model, tmp_path, "int8-dynamic")
    path = int8.graph_path("denoiser")
    model = onnx.load(str(path))
    scale = [i for i in model.graph.initializer if i.name.endswith("_scale")][-1]
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 3, scale.name))
    onnx.save_model(model, str(path))
    family = load_model(tiny_dit_model[0])
    result = verify(Bundle(int8.root, int8.manifest), family, GuidanceSchedule.load(tiny_dit_model[1]), raise_on_failure=False)
    assert result.max_rel_error > PRECISION_TOLERANCE["int8-dynamic"]


def test_calibration_feeds_are_the_plans_denoiser_inputs(tiny_dit_model, tmp_path):
    bundle = _build(tiny_dit_model, tmp_path, "fp32")
    family = load_model(tiny_dit_model[0])
    feeds = calibration_feeds(bundle, family, images=4)
    assert len(feeds) == len(bundle.steps)
    for feed, step in zip(feeds, bundle.steps):
        rows = 8 if step.guided else 4
        assert feed["sample"].shape[0] == rows and feed["class_labels"].shape == (rows,)
        assert np.all(feed["timestep"] == np.float32(step.model_timestep))
        if step.guided:  # [x; x] with [cond; null class]
            np.testing.assert_array_equal(feed["sample"][:4], feed["sample"][4:])
            assert np.all(feed["class_labels"][4:] == family.num_classes)
    assert not np.allclose(feeds[0]["sample"][:4], feeds[-1]["sample"][:4])  # the latents move along the plan


def test_int8_static_bundle_has_symmetric_qdq_and_verifies(tiny_dit_model, tmp_path):
    int8 = _build(tiny_dit_model, tmp_path, "int8")
    model = onnx.load(str(int8.graph_path("denoiser")))
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and {n.op_type for n in model.graph.node} >= {"DequantizeLinear"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(np.all(z == 0) and z.dtype == np.int8 for z in zero_points)  # TensorRT's form
    assert int8.manifest.verification.max_rel_error <= PRECISION_TOLERANCE["int8"]
    assert int8.manifest.summary["gates"]["precision"]["conversion"]["calibration"]["inputs"] == len(int8.steps)


def test_bf16_graph_keeps_fp32_io_cpu_refuses_it_and_emulation_verifies(tiny_dit_model, tmp_path):
    bf16 = _build(tiny_dit_model, tmp_path, "bf16")
    model = onnx.load(str(bf16.graph_path("denoiser")))
    low = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.BFLOAT16]
    assert len(low) == 12  # one weight per block Linear
    float32 = onnx.TensorProto.FLOAT
    assert all(
        v.type.tensor_type.elem_type in (float32, onnx.TensorProto.INT64) for v in [*model.graph.input, *model.graph.output]
    )
    with pytest.raises(BackendUnavailable, match="bf16"):
        OnnxRuntimeRunner(bf16, device="cpu")
    assert "emulated" in bf16.manifest.verification.backend
    assert 0 < bf16.manifest.verification.max_rel_error <= PRECISION_TOLERANCE["bf16"]
    casts = sum(n.op_type == "Cast" for n in model.graph.node)
    emulated = emulate_bf16(model)  # every bf16 product in fp32 between casts: CPU kernels exist for all of it
    assert sum(n.op_type == "Cast" for n in emulated.graph.node) == casts + 2 * 12 + 12


def test_auto_keeps_fp32_without_a_quality_measure(tiny_dit_model, tmp_path):
    bundle = _build(tiny_dit_model, tmp_path, "auto")
    gate = bundle.manifest.summary["gates"]["precision"]
    assert bundle.manifest.precision == "fp32" and gate["shipped"] == "fp32" and "no sample-quality measure" in gate["decision"]
    assert "int8" not in "".join(_ops(bundle))


def _record(differences: list[float], fp32_ms: float, int8_ms: float, accuracy: float = 1.0) -> PrecisionRecord:
    base = Side("fp32", "s", 10, 0.5, [3.0, 3.0], [1.0, 1.0])
    cand = Side("int8", "s", 10, 0.5, [3.0 + d for d in differences], [accuracy, accuracy])
    gate = stages.Gate("precision", "", [Comparison(cand, base, 0, 500, 2)], 0)
    return PrecisionRecord("auto", "", gate, "int8-dynamic", speed={"fp32_ms": fp32_ms, "int8-dynamic_ms": int8_ms, "reps": 3})


@pytest.mark.parametrize(
    "differences, fp32_ms, int8_ms, accuracy, explicit, ships",
    [
        ([-0.01, 0.02], 10, 8, 1.0, False, True),  # inside the noise and faster
        ([-0.01, -0.02], 10, 8, 1.0, False, True),  # better and faster
        ([0.01, 0.02], 10, 8, 1.0, False, False),  # worse on every group
        ([-0.01, 0.02], 10, 12, 1.0, False, False),  # no faster: not a win
        ([-0.01, 0.02], 10, 8, 0.5, False, False),  # loses class accuracy
        ([0.01, 0.02], 10, 12, 1.0, True, True),  # explicit: ships and says what it cost
    ],
)
def test_gate_ships_only_a_reduced_bundle_that_is_no_worse_and_faster(differences, fp32_ms, int8_ms, accuracy, explicit, ships):
    shipped, why = _decide(_record(differences, fp32_ms, int8_ms, accuracy), explicit)
    assert shipped is ships
    assert why.startswith("int8-dynamic ships" if ships else "fp32 ships")
    assert f"{int8_ms:.1f} ms vs {fp32_ms:.1f} ms" in why


@pytest.mark.skipif(not (REFERENCE_MODEL / "transformer").is_dir(), reason="the reference model is not trained yet")
def test_gate_on_the_reference_model_compares_bundles_on_gate_seeds(tmp_path, monkeypatch):
    """The real gate path, on fewer gate images: both bundles scored through ONNX Runtime, paired, recorded."""
    monkeypatch.setattr(stages, "GATE_NUM", 40)
    schedule = GuidanceSchedule.load(
        Path(__file__).resolve().parent.parent / "docs" / "search" / "digits-dit" / "budget-30" / "schedule.json"
    )
    schedule.save(tmp_path / "s.json")
    build(BuildOptions(schedule=tmp_path / "s.json", out=tmp_path / "b", measure=False, precision="auto"))
    bundle = Bundle.open(tmp_path / "b")
    gate = bundle.manifest.summary["gates"]["precision"]
    (c,) = [Comparison.from_json(x) for x in gate["comparisons"]]
    assert c.num == 40 and c.groups == 2 and c.baseline.label == "fp32 bundle"
    assert gate["speed"]["fp32_ms"] > 0 and gate["candidate"] == "int8-dynamic"
    assert bundle.manifest.precision == gate["shipped"] and gate["shipped"] in ("fp32", "int8-dynamic")
    assert gate["decision"].startswith(f"{gate['shipped']} ships")
    assert "precision gate" in (tmp_path / "b" / "report.md").read_text()
    assert verify(bundle, load_model(None), schedule).passed


def test_bad_precision_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rstr.export.cli", "build", "--precision", "int4", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "int4" in proc.stderr and "Traceback" not in proc.stderr


def test_precision_needs_an_fp32_export(tiny_dit_model, tmp_path):
    model, schedule = tiny_dit_model
    with pytest.raises(RstrError, match="--dtype bf16"):
        build(BuildOptions(model=model, schedule=schedule, out=tmp_path / "b", dtype="bf16", precision="int8"))
    assert not (tmp_path / "b").exists()


def test_tensorrt_takes_precision_from_the_onnx_and_refuses_dynamic_int8():
    from rstr.engines.tensorrt.build import _precision_kwargs

    assert _precision_kwargs("bf16", strongly_typed=True) == {} and _precision_kwargs("int8", strongly_typed=True) == {}
    assert _precision_kwargs("bf16", strongly_typed=False) == {"bf16": True}
    assert _precision_kwargs("int8", strongly_typed=False) == {"int8": True}
    assert _precision_kwargs("fp32", strongly_typed=False) == {}
    with pytest.raises(BackendUnavailable, match="--precision int8"):
        _precision_kwargs("int8-dynamic", strongly_typed=True)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_tensorrt_runs_reduced_precision_bundles(tiny_dit_model, tmp_path, precision):
    """TensorRT engines of a bf16 / int8 bundle agree with the CPU check of the same graph (emulated for bf16)."""
    from rstr.engines.tensorrt import TensorRTRunner
    from rstr.export.precision import cpu_checkable

    model, schedule = tiny_dit_model
    build(
        BuildOptions(model=model, schedule=schedule, out=tmp_path / "b", measure=False, precision=precision, backend="tensorrt")
    )
    bundle = Bundle.open(tmp_path / "b")
    assert bundle.manifest.precision == precision and bundle.engines_for("tensorrt")
    noise = np.random.default_rng(0).standard_normal(bundle.sample.concrete(1), dtype=np.float32)
    cond = {"class_labels": np.array([3])}
    with OnnxRuntimeRunner(cpu_checkable(bundle, tmp_path / "cpu")) as ort, TensorRTRunner(bundle) as trt:
        want, got = ort.infer(noise, cond), trt.infer(noise, cond)
    assert np.abs(got - want).max() / np.abs(want).max() <= PRECISION_TOLERANCE[precision]
