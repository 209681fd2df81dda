"""Hardening of the bundle readers: one bundle validator behind every reader, and bad bundles refused the same way by all four.

The shared corpus (tests/bad_bundles.py) is built in the test session from the good pixel-space
DiT bundle (tests/conftest.py).  Each bad bundle goes through ``Pipeline.load``, ``rstr-export
run``, ``rstr-export verify`` (command lines run in-process, through their real entry point) and
the C++ ``rstr-run``: each must refuse it in one line naming the case's reason, and the lines
must agree word for word once the bundle's path is taken out.  Also here: what ``verify`` trusts
in a bundle's provenance (its model, its adapter), and the one-line, typed errors of the runtimes
that read a good bundle with bad input (the ``Pipeline`` API, ``rstr-export run``, ``rstr-run``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_bundles import CASES, make_corpus, normalise, rehash
from hardening_support import run_cli, zero_adapter

from rstr.errors import RstrError


@pytest.fixture(scope="session")
def corpus(pixel_dit_bundle, tmp_path_factory) -> dict[str, Path]:
    return make_corpus(pixel_dit_bundle, tmp_path_factory.mktemp("bad-bundles"))


def python_readers(bundle: Path, tmp_path: Path, capsys, monkeypatch) -> dict[str, tuple[int, str]]:
    """Exit code (1 = refused, 0 = accepted) and error line of each Python reader."""
    from rstr.engines import Pipeline
    from rstr.export.cli import main

    try:
        Pipeline.load(bundle, backend="onnxruntime-cpu").close()
        verdicts = {"Pipeline.load": (0, "")}
    except RstrError as err:
        verdicts = {"Pipeline.load": (1, str(err))}
    run = ["rstr-export", "run", str(bundle), "--class", "3,4", "--backend", "onnxruntime-cpu", "--out", str(tmp_path / "x.png")]
    verdicts["rstr-export run"] = run_cli(main, run, capsys, monkeypatch)
    verdicts["rstr-export verify"] = run_cli(main, ["rstr-export", "verify", str(bundle)], capsys, monkeypatch)
    return verdicts


def assert_refused(verdicts: dict[str, tuple[int, str]], bundle: Path, reason: str) -> str:
    """Every reader refused in one line containing ``reason``, and all say the same; return that line."""
    lines = {}
    for reader, (code, text) in verdicts.items():
        assert code == 1, f"{reader} accepted the bundle (exit {code}): {text}"
        assert len(text.strip().splitlines()) == 1, f"{reader} did not answer in one line:\n{text}"
        assert reason in text, f"{reader}: {text.strip()!r} lacks {reason!r}"
        lines[reader] = normalise(text.strip(), bundle)
    assert len(set(lines.values())) == 1, lines
    return next(iter(lines.values()))


def test_the_corpus_covers_every_area():
    areas = {}
    for case in CASES.values():
        areas[case.area] = areas.get(case.area, 0) + 1
    assert set(areas) == {"json", "schema", "rules", "files", "graphs"} and all(n >= 5 for n in areas.values()), areas


def test_the_good_bundle_is_accepted_by_every_python_reader(pixel_dit_bundle, tmp_path, capsys, monkeypatch):
    verdicts = python_readers(pixel_dit_bundle, tmp_path, capsys, monkeypatch)
    assert verdicts["Pipeline.load"] == (0, "") and verdicts["rstr-export run"][0] == 0, verdicts


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_bundle_is_refused_alike_by_the_python_readers(case, corpus, tmp_path, capsys, monkeypatch):
    bundle = corpus[case]
    assert_refused(python_readers(bundle, tmp_path, capsys, monkeypatch), bundle, CASES[case].reason)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.cpp
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_bundle_is_refused_alike_by_cpp_and_python(case, corpus, rstr_run, tmp_path, capsys, monkeypatch):
    bundle = corpus[case]
    out = tmp_path / "x.npy"
    proc = subprocess.run(
        [str(rstr_run), str(bundle), "--out", str(out), "--class", "3", "--seed", "0"], capture_output=True, text=True, timeout=60
    )
    verdicts = python_readers(bundle, tmp_path, capsys, monkeypatch)
    verdicts["rstr-run"] = (proc.returncode, proc.stderr)
    assert_refused(verdicts, bundle, CASES[case].reason)
    assert not out.exists()


# --------------------------------------------------------------- verify: provenance is information
def _copy(bundle: Path, dest: Path, edit=None) -> Path:
    """A copy of ``bundle``; ``edit(manifest, copy)`` may change its manifest (and files, rehashing them)."""
    shutil.copytree(bundle, dest)
    if edit is not None:
        manifest = json.loads((dest / "manifest.json").read_text())
        edit(manifest, dest)
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _verify(bundle: Path, capsys, monkeypatch, *extra: str) -> tuple[int, str]:
    from rstr.export.cli import main

    return run_cli(main, ["rstr-export", "verify", str(bundle), *extra], capsys, monkeypatch)


def _with_adapter(model: Path, adapter: str = "stages/adapter", extra: str | None = None, sha: str | None = None):
    """An edit that puts a zero adapter at ``adapter`` inside the bundle, lists its files and records its hash."""

    def edit(m: dict, copy: Path) -> None:
        from rstr.calibrate import adapter_sha256

        directory = zero_adapter(model, copy / adapter)
        for f in sorted(directory.iterdir()):
            rehash(m, copy, f.relative_to(copy).as_posix())
        if extra is not None:
            (directory / extra).write_text("{}")
        m["provenance"].update(adapter=adapter, adapter_sha256=sha or adapter_sha256(directory))

    return edit


def test_verify_uses_the_recorded_model_only_while_it_hashes_the_same(pixel_dit_bundle, tmp_path, capsys, monkeypatch):
    recorded = Path(json.loads((pixel_dit_bundle / "manifest.json").read_text())["provenance"]["model"])
    code, err = _verify(pixel_dit_bundle, capsys, monkeypatch)
    assert code == 0, err
    changed = shutil.copytree(recorded, tmp_path / "changed-model")
    (changed / "rstr.json").write_text(json.dumps({**json.loads((changed / "rstr.json").read_text()), "note": "edited"}))
    moved = _copy(pixel_dit_bundle, tmp_path / "moved", lambda m, _: m["provenance"].update(model=str(changed)))
    code, err = _verify(moved, capsys, monkeypatch)
    assert code == 1 and "is not the one bundle" in err and "pass --model" in err and len(err.splitlines()) == 1, err
    assert _verify(moved, capsys, monkeypatch, "--model", str(recorded))[0] == 0


@pytest.mark.parametrize(
    "provenance, message",
    [
        ({"model_sha256": None}, "records no hash of its model"),
        ({"model": "/nonexistent/model"}, "which is not on this machine; pass --model"),
    ],
)
def test_verify_refuses_an_untrusted_recorded_model(pixel_dit_bundle, tmp_path, capsys, monkeypatch, provenance, message):
    bundle = _copy(pixel_dit_bundle, tmp_path / "b", lambda m, _: m["provenance"].update(provenance))
    code, err = _verify(bundle, capsys, monkeypatch)
    assert code == 1 and message in err and len(err.splitlines()) == 1, err


def test_verify_loads_the_bundles_own_adapter_when_its_hash_matches(pixel_dit_bundle, tmp_path, capsys, monkeypatch):
    model = Path(json.loads((pixel_dit_bundle / "manifest.json").read_text())["provenance"]["model"])
    bundle = _copy(pixel_dit_bundle, tmp_path / "b", _with_adapter(model))
    code, err = _verify(bundle, capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize(
    "case, message",
    [
        ("outside", "provenance.adapter '../elsewhere' is not inside the bundle"),
        ("hash", "does not match provenance.adapter_sha256"),
        ("unlisted-file", "stages/adapter/allocation.json sits in the adapter but is not listed in files"),
        ("not-listed", "the adapter's adapter_config.json is not listed in files"),
    ],
)
def test_verify_refuses_an_adapter_it_cannot_trust(pixel_dit_bundle, tmp_path, capsys, monkeypatch, case, message):
    model = Path(json.loads((pixel_dit_bundle / "manifest.json").read_text())["provenance"]["model"])
    if case == "outside":
        zero_adapter(model, tmp_path / "elsewhere")
        edit = lambda m, _: m["provenance"].update(adapter="../elsewhere", adapter_sha256="0" * 64)  # noqa: E731
    elif case == "hash":
        edit = _with_adapter(model, sha="1" * 64)
    elif case == "unlisted-file":
        edit = _with_adapter(model, extra="allocation.json")
    else:
        edit = lambda m, c: (zero_adapter(model, c / "stages" / "adapter"), m["provenance"].update(adapter="stages/adapter"))  # noqa: E731
    bundle = _copy(pixel_dit_bundle, tmp_path / "b", edit)
    code, err = _verify(bundle, capsys, monkeypatch)
    assert code == 1 and message in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------ the runtime API: typed errors
@pytest.fixture(scope="module")
def pipe(pixel_dit_bundle):
    from rstr.engines import Pipeline

    with Pipeline.load(pixel_dit_bundle, backend="onnxruntime-cpu") as p:
        yield p


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda p: p({"class_labels": [1, 2]}, uncond={"class_labels": [-1, 10]}, seed=0),
            "InputError",
            "unconditional class label -1",
        ),
        (
            lambda p: p({"class_labels": [1, 2]}, uncond={"class_labels": [11, 10]}, seed=0),
            "InputError",
            "unconditional class label 11",
        ),
        (lambda p: p({"class_labels": [1, 2]}, seed=-1), "InputError", "seed -1 must be an integer from 0 to 2^64 - 1"),
        (lambda p: p({"class_labels": [1, 2]}, seed=True), "InputError", "seed True must be an integer from 0 to 2^64 - 1"),
        (lambda p: p({"class_labels": [1, 2]}, seed=1.5), "InputError", "seed 1.5 must be an integer from 0 to 2^64 - 1"),
        (lambda p: p([1, 2], seed=0), "InputError", "conditioning must be a dict of arrays keyed by ['class_labels'] (got list)"),
        (lambda p: p({"class_labels": ["a", "b"]}, seed=0), "InputError", "expected integers (int64)"),
        (lambda p: p({"class_labels": [[1], [2, 3]]}, seed=0), "InputError", "is not an array"),
        (lambda p: p({"class_labels": [1, 2]}, noise=[["x"]]), "InputError", "noise has shape"),
        (lambda p: p({"class_labels": [1, 2]}), "InputError", "give exactly one of seed= or noise="),
    ],
)
def test_runtime_api_errors_are_typed_one_line(pipe, call, error, message):
    from rstr.engines import base

    with pytest.raises(RstrError) as err:
        call(pipe)
    assert type(err.value) is getattr(base, error) and message in str(err.value) and "\n" not in str(err.value), err.value


def test_the_null_class_is_a_valid_unconditional_label(pipe):
    a = pipe({"class_labels": [1, 2]}, seed=0).latents
    b = pipe({"class_labels": [1, 2]}, uncond={"class_labels": [10, 10]}, seed=0).latents
    assert (a == b).all()


def test_unknown_backend_is_a_backend_error(pixel_dit_bundle):
    from rstr.engines import Pipeline

    from rstr.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="backend 'onnx' is not one of"):
        Pipeline.load(pixel_dit_bundle, backend="onnx")


def test_closing_a_pipeline_while_another_thread_generates(pixel_dit_bundle):
    """close() waits for the generation in progress; later calls raise InactiveError, never a KeyError."""
    import threading

    from rstr.engines import Pipeline
    from rstr.engines.base import InactiveError

    p = Pipeline.load(pixel_dit_bundle, backend="onnxruntime-cpu")
    started, results, errors = threading.Event(), [], []

    def generate():
        started.set()
        for seed in range(200):
            try:
                results.append(p({"class_labels": [1, 2]}, seed=seed).latents)
            except InactiveError as err:
                errors.append(err)
                return
        errors.append(None)

    thread = threading.Thread(target=generate)
    thread.start()
    started.wait()
    while not results:
        thread.join(0.001)
    p.close()
    thread.join()
    assert isinstance(errors[0], InactiveError) and all(r.shape == (2, 1, 8, 8) for r in results)
    with pytest.raises(InactiveError, match="is not active"):
        p({"class_labels": [1, 2]}, seed=0)


# ---------------------------------------------------------------- rstr-export run: one-line errors
def _run(bundle: Path, capsys, monkeypatch, *args: str) -> tuple[int, str]:
    from rstr.export.cli import main

    argv = ["rstr-export", "run", str(bundle), "--backend", "onnxruntime-cpu", *args]
    return run_cli(main, argv, capsys, monkeypatch)


def _object_cond(path: Path) -> Path:
    import numpy as np

    np.savez(path, class_labels=np.array([object(), object()], dtype=object))
    return path


def _npy_cond(path: Path) -> Path:
    import numpy as np

    np.save(path, np.array([1, 2]))
    return path


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda t: (t / "n.txt").write_text("0.1 0.2\n"), ["--noise", "{t}/n.txt"], "--noise {t}/n.txt is not a .npy array"),
        (lambda t: None, ["--noise", "{t}/missing.npy"], "--noise {t}/missing.npy: cannot read it (No such file or directory)"),
        (lambda t: _object_cond(t / "c.npz"), ["--cond", "{t}/c.npz"], "--cond {t}/c.npz is not a .npz archive of named arrays"),
        (lambda t: _npy_cond(t / "c.npy"), ["--cond", "{t}/c.npy"], "--cond {t}/c.npy: give a .npz archive of named arrays"),
        (lambda t: None, ["--seed", "-1"], "seed -1 must be an integer from 0 to 2^64 - 1"),
        (lambda t: None, ["--class", "3,11"], "class label 11 is out of range"),
        (lambda t: None, ["--class", "3,x"], "--class '3,x' must be comma-separated integers"),
        (lambda t: None, ["--out", "{t}/x.txt"], "--out {t}/x.txt: use a .npy (latents) or .png (image) file name"),
        (lambda t: (t / "file").write_text(""), ["--out", "{t}/file/x.npy"], "cannot write {t}/file/x.npy: "),
    ],
)
def test_run_refuses_bad_input_in_one_line(pixel_dit_bundle, tmp_path, capsys, monkeypatch, make, args, message):
    make(tmp_path)
    args = [a.format(t=tmp_path) for a in args]
    if "--class" not in args:
        args += ["--class", "1,2"]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.npy")]
    code, err = _run(pixel_dit_bundle, capsys, monkeypatch, *args)
    assert code == 1 and len(err.splitlines()) == 1 and message.format(t=tmp_path) in err, err
    assert not list(tmp_path.glob("*.npy")) or "c.npy" in " ".join(args)


def test_run_on_a_full_disk_is_one_line_and_leaves_nothing(pixel_dit_bundle, tmp_path, capsys, monkeypatch):
    import errno

    import numpy as np

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    code, err = _run(pixel_dit_bundle, capsys, monkeypatch, "--class", "1,2", "--out", str(tmp_path / "x.npy"))
    assert code == 1 and err.strip() == (
        f"rstr-export: error: cannot write {tmp_path / 'x.npy'}: No space left on device; free some space or choose another location"
    )
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_fallback_notice_is_one_plain_line(pixel_dit_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    if _has_tensorrt():
        pytest.skip("TensorRT is installed: no fallback")
    argv = ["run", pixel_dit_bundle, "--class", "1,2", "--out", tmp_path / "x.png"]  # --backend auto
    proc = subprocess.run([sys.executable, "-m", "rstr.export.cli", *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("TensorRT not used (") and lines[0].endswith("falling back to ONNX Runtime (cpu)")
    )


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


# ------------------------------------------------------------ rstr-run: its options and inputs
@pytest.mark.cpp
def test_rstr_run_documents_and_takes_the_trust_option(rstr_run, pixel_dit_bundle, tmp_path):
    """Host code of TensorRT engines is off unless --trust-engine-host-code (the ONNX Runtime backends ignore it)."""
    usage = subprocess.run([str(rstr_run), "--help"], capture_output=True, text=True).stdout
    assert "--trust-engine-host-code" in usage and "whose author" in usage
    args = [str(rstr_run), str(pixel_dit_bundle), "--out", str(tmp_path / "x.npy"), "--class", "3", "--seed", "0"]
    assert subprocess.run([*args, "--trust-engine-host-code"], capture_output=True).returncode == 0


@pytest.mark.cpp
@pytest.mark.parametrize(
    "labels, message",
    [
        (
            [-1, 10],
            "unconditional input 'class_labels' holds class label -1, out of range: this bundle has classes 0..9 and the null class 10",
        ),
        ([11, 10], "holds class label 11, out of range"),
        (None, "--seed expects an integer from 0 to 2^64 - 1, got '-1'"),
    ],
)
def test_rstr_run_checks_unconditional_labels_and_the_seed(rstr_run, pixel_dit_bundle, tmp_path, labels, message):
    import numpy as np

    args = [str(rstr_run), str(pixel_dit_bundle), "--out", str(tmp_path / "x.npy"), "--class", "3"]
    if labels is None:
        args += ["--seed", "-1"]
    else:
        np.save(tmp_path / "u.npy", np.array(labels, np.int64))
        args += ["--seed", "0", "--uncond", str(tmp_path / "u.npy")]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("rstr-run: error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "x.npy").exists()
