"""Fuzzing the readers of user files: any input is accepted and valid, or refused with one user-error line.

Hypothesis mutates a good schedule and a good manifest (replace, delete or add a value anywhere
in the document; values of every JSON type, huge and negative numbers included) and also feeds
them arbitrary JSON and arbitrary text.  The Python schedule and manifest parsers must either
return a valid object or raise their one-line :class:`~rstr.errors.RstrError`; the C++ manifest
reader (through ``rstr-run``) must exit 0 or 1 with one ``rstr-run: error:`` line, never crash
or report an internal error, and refuse exactly the manifests the Python reader refuses, in the
same words.  Examples are derandomised (the same every run) and the whole module runs in well
under a minute.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest
from bad_bundles import normalise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rstr._io import parse_json
from rstr.errors import BundleError, RstrError, ScheduleError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
CPP_FUZZ = settings(FUZZ, max_examples=40)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, -1, 4, 2**31, 2**63, 2**64 - 1, 1.0, 0.5, -0.0, 1e300])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["batch", "float32", "int64", "required", "rstr.bundle", "denoiser.onnx", "../x", "/etc/passwd", ""])
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON document, containers included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated(draw, good: dict) -> dict:
    """``good`` with one to three changes: a value replaced, a key or item removed, or a key added."""
    doc = copy.deepcopy(good)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(doc)]
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        *parents, last = path
        parent = doc
        for key in parents:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.insert(last, draw(json_values))
    return doc


def one_line(err: Exception) -> None:
    assert str(err) and "\n" not in str(err), repr(str(err))


# ---------------------------------------------------------------------------------- schedules
GOOD_SCHEDULE = {
    "format": "rstr.schedule/1",
    "family": "dit",
    "sampler": "ddim",
    "num_steps": 3,
    "default_steps": 4,
    "steps": [{"guided": True, "scale": 2.0}, {"guided": True, "scale": 1.5}, {"guided": False}],
    "timesteps": [900, 500, 0],
}


def _schedule_verdict(data) -> None:
    from rstr.schedule import GuidanceSchedule

    try:
        s = GuidanceSchedule.from_dict(data)
    except ScheduleError as err:
        one_line(err)
        return
    assert GuidanceSchedule.from_dict(s.to_dict()) == s
    assert s.num_steps == len(s.guided) == len(s.scales) >= 1 and s.default_steps >= 1
    assert all((g and math.isfinite(sc) and sc >= 0) or (not g and sc is None) for g, sc in zip(s.guided, s.scales))
    assert s.timesteps is None or list(s.timesteps) == sorted(set(s.timesteps), reverse=True) and s.timesteps[-1] >= 0


@FUZZ
@given(mutated(GOOD_SCHEDULE))
def test_schedule_parser_on_mutated_schedules(data):
    _schedule_verdict(data)


@FUZZ
@given(json_values)
def test_schedule_parser_on_any_json(data):
    _schedule_verdict(data)


@FUZZ
@given(st.binary(max_size=200) | st.builds(lambda s: json.dumps(GOOD_SCHEDULE)[:s], st.integers(0, 300)))
def test_schedule_files_of_any_bytes(tmp_path_factory, data):
    from rstr.schedule import GuidanceSchedule

    path = tmp_path_factory.mktemp("s", numbered=True) / "s.json"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        GuidanceSchedule.load(path)
    except ScheduleError as err:
        one_line(err)


# ----------------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def good_manifest(pixel_dit_bundle) -> dict:
    return json.loads((pixel_dit_bundle / "manifest.json").read_text())


def _manifest_verdict(data) -> None:
    from rstr.engines.manifest import Manifest
    from rstr.engines.validate import document_problem

    try:
        m = Manifest.from_json(data)
    except BundleError as err:
        one_line(err)
        return
    again = m.to_json()
    assert Manifest.from_json(again) == m and document_problem(again) is None
    assert m.sample.shape[0] == m.batch >= 1 and all(isinstance(d, int) for d in m.sample.shape)
    for step in m.plan.steps:
        assert all(math.isfinite(v) for v in (step.timestep, step.model_timestep, step.coef_sample, step.coef_eps))
        assert (step.scale is not None) == step.guided
    assert {g.file for g in m.graphs.values()} <= set(m.files)


def test_the_good_manifest_is_accepted(good_manifest):
    from rstr.engines.manifest import Manifest

    _manifest_verdict(good_manifest)
    Manifest.from_json(good_manifest)


@FUZZ
@given(st.data())
def test_manifest_parser_on_mutated_manifests(good_manifest, data):
    _manifest_verdict(data.draw(mutated(good_manifest)))


@FUZZ
@given(json_values)
def test_manifest_parser_on_any_json(data):
    _manifest_verdict(data)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_strict_json_reader_on_any_text(data):
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        value = parse_json(text)
    except ValueError as err:
        one_line(err)
        return
    json.dumps(value, allow_nan=False)  # what it accepts is standard JSON


# ------------------------------------------------------------------------ the C++ reader, in step
def _python_verdict(bundle: Path) -> tuple[int, str]:
    from rstr.engines import Bundle

    try:
        Bundle.open(bundle)
    except RstrError as err:
        return 1, str(err)
    return 0, ""


@pytest.mark.cpp
@CPP_FUZZ
@given(st.data())
def test_cpp_reader_agrees_with_python_on_mutated_manifests(rstr_run, pixel_dit_bundle, good_manifest, tmp_path_factory, data):
    import shutil

    bundle = tmp_path_factory.getbasetemp() / "fuzz-bundle"
    if not bundle.exists():
        shutil.copytree(pixel_dit_bundle, bundle)
    doc = data.draw(mutated(good_manifest))
    (bundle / "manifest.json").write_text(json.dumps(doc, allow_nan=False))
    out = bundle.parent / "fuzz-out.npy"
    proc = subprocess.run(
        [str(rstr_run), str(bundle), "--out", str(out), "--class", "0", "--seed", "0"], capture_output=True, text=True, timeout=60
    )
    out.unlink(missing_ok=True)
    assert proc.returncode in (0, 1), (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 or (len(lines) == 1 and lines[0].startswith("rstr-run: error: ")), proc.stderr
    code, message = _python_verdict(bundle)
    if code == 1:
        assert proc.returncode == 1, f"C++ accepted what Python refuses: {message}"
        assert normalise(lines[0], bundle) == normalise(message, bundle)
    else:
        assert proc.returncode == 0 or "manifest.json" not in lines[0], f"C++ refused what Python accepts: {lines[0]}"


@st.composite
def corrupted_text(draw, text: str) -> bytes:
    """``text`` with bytes flipped, cut out or inserted (the file a faulty copy or an editor leaves)."""
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@pytest.mark.cpp
@CPP_FUZZ
@given(st.data())
def test_cpp_reader_agrees_with_python_on_corrupted_manifest_text(rstr_run, pixel_dit_bundle, tmp_path_factory, data):
    import shutil

    bundle = tmp_path_factory.getbasetemp() / "fuzz-text-bundle"
    if not bundle.exists():
        shutil.copytree(pixel_dit_bundle, bundle)
    good = (pixel_dit_bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_bytes(data.draw(corrupted_text(good)))
    out = bundle.parent / "fuzz-text-out.npy"
    proc = subprocess.run(
        [str(rstr_run), str(bundle), "--out", str(out), "--class", "0", "--seed", "0"], capture_output=True, timeout=60
    )
    out.unlink(missing_ok=True)
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode in (0, 1) and (proc.returncode == 0 or len(stderr.splitlines()) == 1), stderr
    assert proc.returncode == 0 or stderr.startswith("rstr-run: error: "), stderr
    code, message = _python_verdict(bundle)
    assert proc.returncode == code, (stderr, message)
    if code == 1:
        assert normalise(stderr, bundle) == normalise(message, bundle)
