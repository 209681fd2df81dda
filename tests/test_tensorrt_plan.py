"""TensorRT backend, pure logic that runs everywhere: profiles, engine compatibility, plan bindings and step records.

Manifests come from tests/handmade_bundle.py (docs/bundle.md, made by hand); these tests need no
ONNX file, engine, TensorRT or GPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from handmade_bundle import MIXED, C, H, W, desc, make_manifest
from rstr.engines.bundle import Bundle
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


def _bundle(manifest: dict) -> Bundle:
    """A bundle object for pure planning (no files needed)."""
    return Bundle(Path("b"), Manifest.from_json(manifest))


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
    past = [desc("history", "float32", ["batch", 1, 2, C, H, W])]
    for graph in ("step_guided", "step_single"):
        g = m["graphs"][graph]
        g["inputs"] = [desc(d["name"], "float32", [2]) if d["name"].startswith("coef") else d for d in g["inputs"]] + past
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
