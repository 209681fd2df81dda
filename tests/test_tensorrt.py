"""TensorRT backend: pure logic everywhere; engines and the runner where TensorRT and a GPU are.

The bundle here is made by hand (docs/bundle.md): three tiny ONNX graphs written with
``onnx.helper`` and a manifest with sha256s, so these tests need neither the exporter nor torch
models.  Its denoiser is a toy (tanh of an affine map of sample, timestep and class label) and
its step graphs implement the contract exactly, which a numpy walk of the plan checks.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from rstr.engines.bundle import Bundle, sha256_file
from rstr.engines.manifest import Engine, Manifest, TensorDesc
from rstr.engines.tensorrt.plan import (
    ALIGN,
    BufferSpec,
    buffer_specs,
    check_compatible,
    graphs_needed,
    plan_bindings,
    profiles_for,
    profiles_json,
    record_layout,
    select_engines,
    step_records,
)

from rstr.errors import BackendUnavailable, BundleError

C, H, W = 1, 4, 4
NUM_CLASSES = 10
MIXED = (True, False, True, True, False, False)


# ----------------------------------------------------------------------------- a bundle by hand
def _desc(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def make_manifest(batch: int = 1, guided=MIXED, symbolic_steps: bool = True) -> dict:
    """A manifest per docs/bundle.md; step-graph shapes symbolic ("batch") or concrete."""
    b = batch

    def step_shape(rows):
        return ["batch", C, H, W] if symbolic_steps else [rows, C, H, W]

    one = [1]
    steps = []
    for i, g in enumerate(guided):
        t = 900.0 - 150.0 * i
        steps.append(
            {
                "index": i,
                "timestep": t,
                "model_timestep": t,
                "guided": g,
                "scale": 1.5 + 0.25 * i if g else None,
                "batch": 2 * b if g else b,
                "coef_sample": 1.0 + 0.01 * i,
                "coef_eps": -0.2 - 0.03 * i,
            }
        )
    return {
        "format": "rstr.bundle",
        "version": 1,
        "family": "dit",
        "batch": b,
        "dtype": "fp32",
        "sample": _desc("sample", "float32", [b, C, H, W]),
        "graphs": {
            "denoiser": {
                "file": "denoiser.onnx",
                "inputs": [
                    _desc("sample", "float32", ["batch", C, H, W]),
                    _desc("timestep", "float32", ["batch"]),
                    _desc("class_labels", "int64", ["batch"]),
                ],
                "outputs": [_desc("model_output", "float32", ["batch", C, H, W])],
            },
            "step_guided": {
                "file": "step_guided.onnx",
                "inputs": [
                    _desc("sample", "float32", step_shape(b)),
                    _desc("model_output", "float32", step_shape(2 * b)),
                    _desc("scale", "float32", one),
                    _desc("coef_sample", "float32", one),
                    _desc("coef_eps", "float32", one),
                ],
                "outputs": [
                    _desc("next_sample", "float32", step_shape(b)),
                    _desc("next_sample_pair", "float32", step_shape(2 * b)),
                ],
            },
            "step_single": {
                "file": "step_single.onnx",
                "inputs": [
                    _desc("sample", "float32", step_shape(b)),
                    _desc("model_output", "float32", step_shape(b)),
                    _desc("coef_sample", "float32", one),
                    _desc("coef_eps", "float32", one),
                ],
                "outputs": [
                    _desc("next_sample", "float32", step_shape(b)),
                    _desc("next_sample_pair", "float32", step_shape(2 * b)),
                ],
            },
        },
        "conditioning": {
            "inputs": [_desc("class_labels", "int64", ["batch"])],
            "unconditional": {"class_labels": {"fill": NUM_CLASSES}},
            "num_classes": NUM_CLASSES,
        },
        "plan": {
            "init_noise_sigma": 1.0,
            "num_steps": len(steps),
            "default_steps": len(steps),
            "passes_per_image": len(steps) + sum(guided),
            "compute_fraction": (len(steps) + sum(guided)) / (2 * len(steps)),
            "sampler": "ddim",
            "steps": steps,
        },
        "decoder": None,
        "provenance": {"model": "hand-made", "schedule_sha256": "0" * 64},
        "files": {f"{g}.onnx": {"sha256": "0" * 64} for g in ("denoiser", "step_guided", "step_single")},
        "engines": [],
    }


def _bundle(manifest: dict) -> Bundle:
    """A bundle object for pure planning (no files needed)."""
    return Bundle(Path("b"), Manifest.from_json(manifest))


def _write_graphs(root: Path, batch: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name))

    def save(graph, name):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(root / name))

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        const("k_s", 0.9),
        const("k_t", 0.001),
        const("k_l", 0.01),
        const("col", [-1, 1, 1, 1], np.int64),
        helper.make_node("Reshape", ["timestep", "col"], ["t4"]),
        helper.make_node("Cast", ["class_labels"], ["lf"], to=f),
        helper.make_node("Reshape", ["lf", "col"], ["l4"]),
        helper.make_node("Mul", ["sample", "k_s"], ["a"]),
        helper.make_node("Mul", ["t4", "k_t"], ["bt"]),
        helper.make_node("Mul", ["l4", "k_l"], ["bl"]),
        helper.make_node("Add", ["a", "bt"], ["ab"]),
        helper.make_node("Add", ["ab", "bl"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["model_output"]),
    ]
    save(
        helper.make_graph(
            nodes,
            "denoiser",
            [
                helper.make_tensor_value_info("sample", f, ["batch", C, H, W]),
                helper.make_tensor_value_info("timestep", f, ["batch"]),
                helper.make_tensor_value_info("class_labels", i64, ["batch"]),
            ],
            [helper.make_tensor_value_info("model_output", f, ["batch", C, H, W])],
        ),
        "denoiser.onnx",
    )

    b = batch
    tail = [
        helper.make_node("Mul", ["sample", "coef_sample"], ["xs"]),
        helper.make_node("Mul", ["eps", "coef_eps"], ["es"]),
        helper.make_node("Add", ["xs", "es"], ["next_sample"]),
        helper.make_node("Concat", ["next_sample", "next_sample"], ["next_sample_pair"], axis=0),
    ]
    outs = [
        helper.make_tensor_value_info("next_sample", f, [b, C, H, W]),
        helper.make_tensor_value_info("next_sample_pair", f, [2 * b, C, H, W]),
    ]
    scalars = [helper.make_tensor_value_info(n, f, [1]) for n in ("coef_sample", "coef_eps")]
    guided_nodes = [
        const("halves", [b, b], np.int64),
        helper.make_node("Split", ["model_output", "halves"], ["c", "u"], axis=0),
        helper.make_node("Sub", ["c", "u"], ["d"]),
        helper.make_node("Mul", ["d", "scale"], ["sd"]),
        helper.make_node("Add", ["u", "sd"], ["eps"]),
    ] + tail
    save(
        helper.make_graph(
            guided_nodes,
            "step_guided",
            [
                helper.make_tensor_value_info("sample", f, [b, C, H, W]),
                helper.make_tensor_value_info("model_output", f, [2 * b, C, H, W]),
                helper.make_tensor_value_info("scale", f, [1]),
            ]
            + scalars,
            outs,
        ),
        "step_guided.onnx",
    )
    single_nodes = [helper.make_node("Identity", ["model_output"], ["eps"])] + tail
    save(
        helper.make_graph(
            single_nodes,
            "step_single",
            [
                helper.make_tensor_value_info("sample", f, [b, C, H, W]),
                helper.make_tensor_value_info("model_output", f, [b, C, H, W]),
            ]
            + scalars,
            outs,
        ),
        "step_single.onnx",
    )


def write_manifest(root: Path, manifest: dict) -> None:
    names = [g["file"] for g in manifest["graphs"].values()] + [e["file"] for e in manifest.get("engines", [])]
    manifest["files"] = {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in names}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_bundle(root: Path, batch: int = 1, guided=MIXED) -> Bundle:
    root.mkdir(parents=True, exist_ok=True)
    _write_graphs(root, batch)
    write_manifest(root, make_manifest(batch, guided))
    return Bundle.open(root)


def reference_walk(manifest: dict, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """docs/bundle.md's walk in numpy, with the toy denoiser."""

    def denoiser(x, t, lab):
        return np.tanh(0.9 * x + 0.001 * t[:, None, None, None] + 0.01 * lab.astype(np.float32)[:, None, None, None])

    manifest = manifest.to_json()
    b = manifest["batch"]
    uncond = np.full_like(labels, manifest["conditioning"]["unconditional"]["class_labels"]["fill"])
    x = noise.astype(np.float64) * manifest["plan"]["init_noise_sigma"]
    for s in manifest["plan"]["steps"]:
        if s["guided"]:
            out = denoiser(np.concatenate([x, x]), np.full(2 * b, s["model_timestep"]), np.concatenate([labels, uncond]))
            c, u = out[:b], out[b:]
            eps = u + s["scale"] * (c - u)
        else:
            eps = denoiser(x, np.full(b, s["model_timestep"]), labels)
        x = s["coef_sample"] * x + s["coef_eps"] * eps
    return x


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _inputs(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, C, H, W), dtype=np.float32), rng.integers(0, NUM_CLASSES, batch).astype(np.int64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundle"), batch=2)


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("symbolic", [True, False])
def test_profiles_from_manifest_inputs(batch, symbolic):
    m = make_manifest(batch, symbolic_steps=symbolic)
    den = [TensorDesc.from_json(d) for d in m["graphs"]["denoiser"]["inputs"]]
    profiles = profiles_for(den, batch, "denoiser")
    assert len(profiles) == 2  # one fixed profile per batch: B, then 2B
    for n, p in zip((batch, 2 * batch), profiles):
        assert p["sample"] == ((n, C, H, W),) * 3
        assert p["timestep"] == ((n,),) * 3
        assert p["class_labels"] == ((n,),) * 3
    only_2b = profiles_for(den, batch, "denoiser", rows=[2 * batch])
    assert [p["sample"][0][0] for p in only_2b] == [2 * batch]

    guided = profiles_for([TensorDesc.from_json(d) for d in m["graphs"]["step_guided"]["inputs"]], batch, "step_guided")
    assert len(guided) == 1
    assert guided[0]["sample"] == ((batch, C, H, W),) * 3
    assert guided[0]["model_output"] == ((2 * batch, C, H, W),) * 3  # rows [cond; uncond]
    assert guided[0]["scale"] == ((1,),) * 3
    single = profiles_for([TensorDesc.from_json(d) for d in m["graphs"]["step_single"]["inputs"]], batch, "step_single")
    assert single[0]["model_output"] == ((batch, C, H, W),) * 3
    assert "scale" not in single[0]

    js = profiles_json(profiles, [batch, 2 * batch])
    assert [p["batch"] for p in js] == [batch, 2 * batch]
    assert js[1]["inputs"]["sample"] == {"min": [2 * batch, C, H, W], "opt": [2 * batch, C, H, W], "max": [2 * batch, C, H, W]}
    json.dumps(js)  # goes into the manifest as is


def test_profiles_refuse_unknown_axes_and_wrong_rows():
    with pytest.raises(BundleError, match="named 'height'"):
        profiles_for([TensorDesc("sample", "float32", ("batch", 1, "height", 8))], 1, "denoiser")
    with pytest.raises(BundleError, match="docs/bundle.md says 4"):
        profiles_for([TensorDesc("model_output", "float32", (2, 1, 8, 8))], 2, "step_guided")


def test_profiles_take_the_exporters_axis_names():
    """The exporter names the step graphs' 2B axis ``batch2`` (export/graphs.py): any symbolic axis 0 takes the contract's rows."""
    descs = [TensorDesc("sample", "float32", ("batch", 1, 8, 8)), TensorDesc("model_output", "float32", ("batch2", 1, 8, 8))]
    (profile,) = profiles_for(descs, 2, "step_guided")
    assert profile["sample"] == ((2, 1, 8, 8),) * 3 and profile["model_output"] == ((4, 1, 8, 8),) * 3


def test_graphs_and_rows_needed():
    plan = _bundle(make_manifest(3)).plan
    assert graphs_needed(plan) == ["denoiser", "step_guided", "step_single"]
    assert plan.denoiser_rows == [3, 6]
    all_guided = _bundle(make_manifest(3, guided=(True, True))).plan
    assert graphs_needed(all_guided) == ["denoiser", "step_guided"]
    assert all_guided.denoiser_rows == [6]


# ----------------------------------------------------------------------------- compatibility
ENTRY = {
    "backend": "tensorrt",
    "graph": "denoiser",
    "file": "engines/denoiser.plan",
    "tensorrt_version": "10.3.0.26",
    "compute_capability": "8.9",
    "device_name": "NVIDIA L40S",
    "profiles": [],
}


def _engine(**changes) -> Engine:
    return Engine.from_json({**ENTRY, **changes})


def test_compatible_engine_is_accepted():
    check_compatible(_engine(), "10.3.0.26", "8.9")
    check_compatible(_engine(), "10.3.0", "8.9")  # the build number does not matter


@pytest.mark.parametrize("version, cc", [("10.7.0.23", "9.0"), ("10.7.0", "8.9"), ("10.3.0", "9.0"), ("11.4.0", "8.9")])
def test_incompatible_engine_is_refused_with_the_fix(version, cc):
    with pytest.raises(BackendUnavailable) as err:
        check_compatible(_engine(), version, cc)
    short = ".".join(version.split(".")[:3])
    assert str(err.value) == (
        f"engine engines/denoiser.plan was built for TensorRT 10.3.0 on compute capability 8.9; "
        f"this machine has TensorRT {short} on {cc}: rebuild with `rstr-export build --backend tensorrt`"
    )


def test_version_and_hardware_compatible_engines():
    vc = _engine(version_compatible=True)
    check_compatible(vc, "10.7.0", "8.9")  # later release, same major
    check_compatible(vc, "11.1.0", "8.9")  # TensorRT 10 version-compatible engines run on 11
    with pytest.raises(BackendUnavailable):
        check_compatible(vc, "10.2.0", "8.9")  # never on an older release
    hc = _engine(hardware_compatibility="ampere_plus")
    check_compatible(hc, "10.3.0", "9.0")
    with pytest.raises(BackendUnavailable):
        check_compatible(hc, "10.3.0", "7.5")
    with pytest.raises(BundleError, match="lacks 'compute_capability'"):
        check_compatible(Engine.from_json({k: v for k, v in ENTRY.items() if k != "compute_capability"}), "10.3.0", "8.9")


def _entries(manifest: dict, rows_order=None) -> list[dict]:
    b = manifest["batch"]
    plan = _bundle(manifest).plan
    rows = rows_order or plan.denoiser_rows
    out = []
    for g in graphs_needed(plan):
        out.append(
            {
                **ENTRY,
                "graph": g,
                "file": f"engines/{g}.plan",
                "profiles": [{"batch": n, "inputs": {}} for n in (rows if g == "denoiser" else [b])],
            }
        )
    return out


def test_select_engines_checks_presence_files_and_compatibility():
    m = make_manifest(2)
    with pytest.raises(
        BackendUnavailable, match="has no TensorRT engines; build them with `rstr-export build --backend tensorrt`"
    ):
        select_engines(_bundle(m), "10.3.0", "8.9")
    m["engines"] = _entries(m)
    m["files"].update({e["file"]: {"sha256": "0" * 64} for e in m["engines"]})
    assert sorted(select_engines(_bundle(m), "10.3.0", "8.9")) == ["denoiser", "step_guided", "step_single"]
    with pytest.raises(BackendUnavailable, match="built for TensorRT 10.3.0 on compute capability 8.9"):
        select_engines(_bundle(m), "10.3.0", "9.0")
    partial = copy.deepcopy(m)
    partial["engines"] = [e for e in partial["engines"] if e["graph"] != "step_single"]
    with pytest.raises(BackendUnavailable, match="no TensorRT engine for step_single"):
        select_engines(_bundle(partial), "10.3.0", "8.9")
    unlisted = copy.deepcopy(m)
    del unlisted["files"]["engines/step_guided.plan"]
    with pytest.raises(BundleError, match=r"engines\[1\].file 'engines/step_guided.plan' is not listed in files"):
        _bundle(unlisted)  # the manifest's own rules refuse it before any engine is selected
    no_b = copy.deepcopy(m)
    no_b["engines"][0]["profiles"] = [{"batch": 4, "inputs": {}}]
    with pytest.raises(BackendUnavailable, match="no profile for batch 2"):
        select_engines(_bundle(no_b), "10.3.0", "8.9")


# ----------------------------------------------------------------------------- plan bindings
@pytest.mark.parametrize("batch", [1, 3])
def test_plan_bindings_guided_steps_take_the_2b_path(batch):
    m = make_manifest(batch)
    m["engines"] = _entries(m, rows_order=[2 * batch, batch])  # profile order comes from the engine entry
    m["files"].update({e["file"]: {"sha256": "0" * 64} for e in m["engines"]})
    bindings = plan_bindings(_bundle(m))
    assert len(bindings) == len(MIXED)
    for sb, step in zip(bindings, m["plan"]["steps"]):
        p = sb.path
        if step["guided"]:
            assert (p.kind, p.rows, p.step_graph, p.denoiser_profile) == ("guided", 2 * batch, "step_guided", 0)
            assert p.feeds["denoiser"]["sample"] == "x2"
            assert p.shapes["denoiser"]["sample"] == (2 * batch, C, H, W)
            assert p.shapes["denoiser"]["class_labels"] == (2 * batch,)
            assert p.shapes["step_guided"]["model_output"] == (2 * batch, C, H, W)
            assert p.feeds["step_guided"]["scale"] == "record/scale"
        else:
            assert (p.kind, p.rows, p.step_graph, p.denoiser_profile) == ("single", batch, "step_single", 1)
            assert p.feeds["denoiser"]["sample"] == "x"
            assert p.shapes["denoiser"]["sample"] == (batch, C, H, W)
            assert p.shapes["step_single"]["model_output"] == (batch, C, H, W)
        step_graph = p.step_graph
        assert p.feeds[step_graph]["sample"] == "x"
        assert p.feeds[step_graph]["next_sample"] == "x_next"
        assert p.feeds[step_graph]["next_sample_pair"] == "x2"
        assert p.feeds["denoiser"]["model_output"] == p.feeds[step_graph]["model_output"] == "model_output"
        assert p.feeds["denoiser"]["class_labels"] == "cond/class_labels"
        assert p.copies == (("x", "x_next"),)
        assert sb.coef_sample == (step["coef_sample"],) and sb.coef_eps == (step["coef_eps"],)
    # One path object per step kind: what one CUDA graph captures.
    assert len({id(sb.path) for sb in bindings}) == 2
    assert [sb.record_offset for sb in bindings] == [i * record_layout(_bundle(m)).size for i in range(len(MIXED))]


def test_plan_bindings_without_engines_use_build_order():
    m = make_manifest(2)
    bindings = plan_bindings(_bundle(m))
    assert {sb.path.kind: sb.path.denoiser_profile for sb in bindings} == {"single": 0, "guided": 1}


def test_buffers_and_step_records():
    batch = 2
    m = make_manifest(batch)
    bundle = _bundle(m)
    specs = buffer_specs(bundle)
    assert specs["x"] == BufferSpec((batch, C, H, W), np.dtype(np.float32))
    assert specs["x2"].shape == specs["model_output"].shape == (2 * batch, C, H, W)
    assert specs["cond/class_labels"] == BufferSpec((2 * batch,), np.dtype(np.int64))
    layout = record_layout(bundle)
    assert all(off % ALIGN == 0 for off in layout.offsets.values()) and layout.size % ALIGN == 0
    table = step_records(bundle, layout)
    assert table.nbytes == len(MIXED) * layout.size
    for i, step in enumerate(m["plan"]["steps"]):
        rec = table[i * layout.size : (i + 1) * layout.size]
        rows = 2 * batch if step["guided"] else batch
        ts = rec[: 4 * 2 * batch].view(np.float32)
        assert np.all(ts[:rows] == np.float32(step["model_timestep"])) and np.all(ts[rows:] == 0)

        def scalar(name, rec=rec):
            return rec[layout.offsets[name] : layout.offsets[name] + 4].view(np.float32)[0]

        assert scalar("scale") == np.float32(step["scale"] or 0.0)
        assert scalar("coef_sample") == np.float32(step["coef_sample"])
        assert scalar("coef_eps") == np.float32(step["coef_eps"])
    unguided_only = _bundle(make_manifest(batch, guided=(False, False)))
    assert buffer_specs(unguided_only)["cond/class_labels"].shape == (batch,)


def test_multistep_plan_binds_history_and_packs_every_coefficient():
    """A plan with one past step: history buffers [B, 1, 2, ...] copied back after each step like x, and records
    holding [current, previous] coefficients (a first-order step padded with 0)."""
    batch, m = 2, make_manifest(2)
    past = [_desc("history", "float32", ["batch", 1, 2, C, H, W])]
    for graph in ("step_guided", "step_single"):
        g = m["graphs"][graph]
        g["inputs"] = [_desc(d["name"], "float32", [2]) if d["name"].startswith("coef") else d for d in g["inputs"]] + past
        g["outputs"] = g["outputs"] + [{**past[0], "name": "next_history"}]
    for i, s in enumerate(m["plan"]["steps"][1:], start=1):
        s["coef_sample"], s["coef_eps"] = [s["coef_sample"], 0.5 * i], [s["coef_eps"], -0.25 * i]
    bundle = _bundle(m)
    assert bundle.plan.history == 1
    specs = buffer_specs(bundle)
    assert specs["history"] == specs["history_next"] == BufferSpec((batch, 1, 2, C, H, W), np.dtype(np.float32))
    for sb in plan_bindings(bundle):
        feeds = sb.path.feeds[sb.path.step_graph]
        assert (feeds["history"], feeds["next_history"]) == ("history", "history_next")
        assert sb.path.copies == (("x", "x_next"), ("history", "history_next"))
        assert sb.path.shapes[sb.path.step_graph]["coef_eps"] == (2,)
    layout = record_layout(bundle)
    table = step_records(bundle, layout)
    for i, step in enumerate(m["plan"]["steps"]):
        rec = table[i * layout.size : (i + 1) * layout.size]
        coefs = {n: rec[layout.offsets[n] : layout.offsets[n] + 8].view(np.float32).tolist() for n in ("coef_sample", "coef_eps")}
        want = {n: step[n] if isinstance(step[n], list) else [step[n], 0.0] for n in ("coef_sample", "coef_eps")}
        assert coefs == {n: np.float32(v).tolist() for n, v in want.items()}


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
def test_version_compatible_engines_load_only_when_their_author_is_trusted():
    from rstr.engines.tensorrt.plan import host_code_allowed

    plain = _engine()
    compatible = _engine(version_compatible=True)
    assert host_code_allowed([plain], trusted=False) is False
    assert host_code_allowed([plain], trusted=True) is False  # nothing to allow: host code stays off
    assert host_code_allowed([plain, compatible], trusted=True) is True
    with pytest.raises(BackendUnavailable) as err:
        host_code_allowed([plain, compatible], trusted=False)
    assert "is version-compatible: it embeds TensorRT's lean runtime as host code" in str(err.value)
    assert "--trust-engine-host-code" in str(err.value) and "\n" not in str(err.value)


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
