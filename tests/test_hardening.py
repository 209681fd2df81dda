"""Hardening: one bundle validator behind every reader, and bad bundles refused the same way by all four.

The shared corpus (tests/bad_bundles.py) is built in the test session from the good pixel-space
DiT bundle (tests/conftest.py).  Each bad bundle goes through ``Pipeline.load``, ``rstr-export
run``, ``rstr-export verify`` (command lines run in-process, through their real entry point) and
the C++ ``rstr-run``: each must refuse it in one line naming the case's reason, and the lines
must agree word for word once the bundle's path is taken out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_bundles import CASES, make_corpus, normalise, rehash

from rstr.errors import RstrError


@pytest.fixture(scope="session")
def corpus(pixel_dit_bundle, tmp_path_factory) -> dict[str, Path]:
    return make_corpus(pixel_dit_bundle, tmp_path_factory.mktemp("bad-bundles"))


def run_cli(main, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """A command line's exit code and stderr, run in-process through its real entry point (``main``)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


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


def _zero_adapter(model: Path, out: Path) -> Path:
    """A peft LoRA adapter whose B matrices are zero (peft's initialisation): merging it changes nothing."""
    from peft import LoraConfig, get_peft_model

    from rstr.families import load_model

    family = load_model(model)
    get_peft_model(family.transformer, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])).save_pretrained(out)
    return out


def _with_adapter(model: Path, adapter: str = "stages/adapter", extra: str | None = None, sha: str | None = None):
    """An edit that puts a zero adapter at ``adapter`` inside the bundle, lists its files and records its hash."""

    def edit(m: dict, copy: Path) -> None:
        from rstr.calibrate import adapter_sha256

        directory = _zero_adapter(model, copy / adapter)
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
        _zero_adapter(model, tmp_path / "elsewhere")
        edit = lambda m, _: m["provenance"].update(adapter="../elsewhere", adapter_sha256="0" * 64)  # noqa: E731
    elif case == "hash":
        edit = _with_adapter(model, sha="1" * 64)
    elif case == "unlisted-file":
        edit = _with_adapter(model, extra="allocation.json")
    else:
        edit = lambda m, c: (_zero_adapter(model, c / "stages" / "adapter"), m["provenance"].update(adapter="stages/adapter"))  # noqa: E731
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


# ------------------------------------------------------ rstr: model directories, schedules, adapters
@pytest.fixture(scope="module")
def model_dir(pixel_dit_bundle) -> Path:
    """The tiny pixel DiT the shared bundle was built from (transformer/, scheduler/, rstr.json)."""
    return Path(json.loads((pixel_dit_bundle / "manifest.json").read_text())["provenance"]["model"])


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    return _zero_adapter(model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


DEEP = "[" * 100_000 + "]" * 100_000


def _rstr(capsys, monkeypatch, *args) -> tuple[int, str]:
    from rstr.cli import main

    return run_cli(main, ["rstr", *map(str, args)], capsys, monkeypatch)


def _edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


def _schedule(tmp: Path, edit) -> Path:
    from rstr.schedule import GuidanceSchedule

    data = GuidanceSchedule.constant(1.5, 3, family="dit", sampler="ddim", default_steps=4).to_dict()
    text = edit(data)
    path = tmp / "s.json"
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return path


def _step_guided_false(d: dict) -> None:
    d["steps"][0]["guided"] = "false"


SCHEDULES = {
    "nested-1e5": (lambda d: DEEP, "is not valid JSON (nested deeper than 100 levels)"),
    "json-array": (lambda d: "[]", "expected a JSON object, got array"),
    "nan-scale": (lambda d: json.dumps(d).replace("1.5", "NaN"), "is not valid JSON (NaN is not a JSON number)"),
    "default-steps-string": (lambda d: d.update(default_steps="4"), "default_steps must be an integer (got string)"),
    "default-steps-null": (lambda d: d.update(default_steps=None), "default_steps must be an integer (got null)"),
    "guided-string": (_step_guided_false, "steps[0].guided must be a boolean (got string)"),
    "more-steps-than-the-scheduler": (
        lambda d: d.update(num_steps=2000, steps=[{"guided": False}] * 2000),
        "schedule has 2000 steps, more than the model's 1000 training timesteps",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_evaluate_refuses_a_bad_schedule_in_one_line(model_dir, tmp_path, capsys, monkeypatch, case):
    edit, message = SCHEDULES[case]
    path = _schedule(tmp_path, edit)
    code, err = _rstr(capsys, monkeypatch, "evaluate", "--model", model_dir, "--schedule", path, "--num", 2, "--groups", 1)
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err


def _model_edit(name: str):
    def config(d: Path, **values) -> None:
        _edit_json(d / "transformer" / "config.json", **values)

    def scheduler(d: Path) -> None:
        _edit_json(d / "scheduler" / "scheduler_config.json", _class_name="DiTTransformer2DModel")

    return {
        "config-array": lambda d: (d / "transformer" / "config.json").write_text("[]"),
        "config-nested-1e5": lambda d: (d / "transformer" / "config.json").write_text(DEEP),
        "rstr-json-array": lambda d: (d / "rstr.json").write_text("[1]"),
        "default-steps-string": lambda d: _edit_json(d / "rstr.json", default_steps="4"),
        "default-steps-null": lambda d: _edit_json(d / "rstr.json", default_steps=None),
        "num-layers-string": lambda d: config(d, num_layers="abc"),
        "more-layers-than-weights": lambda d: config(d, num_layers=6),
        "scheduler-not-a-scheduler": scheduler,
    }[name]


MODELS = {
    "config-array": "transformer/config.json must hold a JSON object, not array",
    "config-nested-1e5": "transformer/config.json is not valid JSON (nested deeper than 100 levels)",
    "rstr-json-array": "rstr.json must hold a JSON object, not array",
    "default-steps-string": "rstr.json: default_steps '4' must be an integer >= 1",
    "default-steps-null": "rstr.json: default_steps None must be an integer >= 1",
    "num-layers-string": "cannot load the weights",
    "more-layers-than-weights": "the weights lack",
    "scheduler-not-a-scheduler": "'DiTTransformer2DModel' is not a diffusers scheduler class",
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_a_broken_model_directory_is_one_line(model_dir, tmp_path, capsys, monkeypatch, case):
    model = shutil.copytree(model_dir, tmp_path / "model")
    _model_edit(case)(model)
    code, err = _rstr(capsys, monkeypatch, "info", model)
    assert code == 1 and len(err.splitlines()) == 1 and MODELS[case] in err, err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


ADAPTERS = {
    "config-array": (lambda d: (d / "adapter_config.json").write_text("[]"), "adapter_config.json must hold a JSON object"),
    "config-nested-1e5": (lambda d: (d / "adapter_config.json").write_text(DEEP), "adapter_config.json is not valid JSON"),
    "truncated-weights": (lambda d: _truncate(d / "adapter_model.safetensors"), "is not a readable safetensors file"),
    "modules-the-model-lacks": (
        lambda d: _edit_json(d / "adapter_config.json", target_modules=["no_such_layer"]),
        "does not fit this model (Target modules {'no_such_layer'} not found",
    ),
    "broken-allocation": (lambda d: (d / "allocation.json").write_text("{broken"), "allocation.json is not valid JSON"),
    "allocation-array": (lambda d: (d / "allocation.json").write_text("[]"), "allocation.json must hold a JSON object"),
}


@pytest.mark.parametrize("case", sorted(ADAPTERS))
def test_a_broken_adapter_is_one_line(model_dir, adapter_dir, tmp_path, capsys, monkeypatch, case):
    edit, message = ADAPTERS[case]
    adapter = shutil.copytree(adapter_dir, tmp_path / "adapter")
    edit(adapter)
    args = ("sample", "--model", model_dir, "--adapter", adapter, "--steps", 2, "--classes", "1", "--out", tmp_path / "x.npy")
    code, err = _rstr(capsys, monkeypatch, *args)
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (DEEP, "is not valid JSON (nested deeper than 100 levels)"),
        ("[]", "not a readable allocation.json"),
        ('{"modules": [{"name": 3}]}', "not a readable allocation.json (KeyError: 'rank')"),
    ],
)
def test_calibrate_refuses_a_broken_allocation_in_one_line(model_dir, tmp_path, capsys, monkeypatch, text, message):
    (tmp_path / "allocation.json").write_text(text)
    args = ("calibrate", "--model", model_dir, "--allocation", tmp_path / "allocation.json", "--out", tmp_path / "ad")
    code, err = _rstr(capsys, monkeypatch, *args)
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err


# --------------------------------------------------------------------------------- atomic writes
def test_build_on_a_full_disk_is_one_line_and_leaves_nothing(model_dir, pixel_dit_bundle, tmp_path, capsys, monkeypatch):
    import errno

    from rstr.export.cli import main

    from rstr.schedule import GuidanceSchedule

    def full(self, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(GuidanceSchedule, "save", full)
    out = tmp_path / "bundle"
    argv = [
        "rstr-export",
        "build",
        "--model",
        str(model_dir),
        "--schedule",
        str(pixel_dit_bundle / "schedule.json"),
        "--out",
        str(out),
    ]
    code, err = run_cli(main, argv, capsys, monkeypatch)
    assert code == 1 and err.strip() == (
        f"rstr-export: error: cannot write {out}: No space left on device; free some space or choose another location"
    )
    assert list(tmp_path.iterdir()) == []


def _killed_writer(folder: Path) -> Path:
    """Start a process that is writing ``folder/bundle`` through atomic_dir, kill it with SIGKILL, return its temporary."""
    script = (
        "import sys, time; from rstr._io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half.onnx').write_bytes(b'x'); print(tmp, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder / "bundle")], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    return tmp


def test_the_next_build_removes_what_a_killed_build_left(tmp_path):
    from rstr._io import atomic_dir

    stale = _killed_writer(tmp_path)
    assert stale.is_dir() and stale.name.startswith(".bundle.")
    host = stale.name.split(".")[2].rsplit("-", 1)[0]
    live = tmp_path / f".bundle.{host}-{os.getppid()}.keep.tmp"  # a running process's temporary: kept
    other = tmp_path / f".other.{host}-1.x.tmp"  # another output's: not ours to touch
    live.mkdir()
    other.mkdir()
    with atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert (tmp_path / "bundle" / "manifest.json").is_file()


@pytest.fixture
def full_disk(tmp_path):
    """A folder where writing fails: a tiny tmpfs filled up when this machine lets us mount one (ENOSPC), else
    None -- then tests limit the file size of the writing process instead (RLIMIT_FSIZE: EFBIG)."""
    mount = tmp_path / "full"
    mount.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True).returncode == 0
    )
    if not mounted:
        yield None
        return
    try:
        with open(mount / "filler", "wb") as fh:
            while True:
                fh.write(bytes(4096))
                fh.flush()
    except OSError:
        pass
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _limit_file_size():
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))


@pytest.mark.cpp
def test_rstr_run_on_a_full_disk_exits_1_in_one_line_and_leaves_nothing(rstr_run, pixel_dit_bundle, tmp_path, full_disk):
    folder = full_disk or tmp_path / "out"
    folder.mkdir(exist_ok=True)
    before = set(folder.iterdir())
    proc = subprocess.run(
        [
            str(rstr_run),
            str(pixel_dit_bundle),
            "--out",
            str(folder / "x.npy"),
            "--png",
            str(folder / "x.png"),
            "--class",
            "3",
            "--seed",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=None if full_disk else _limit_file_size,
    )
    reason = (
        "No space left on device; free some space or choose another location"
        if full_disk
        else "File too large; the file system refuses a file this large; choose another location"
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip() == f"rstr-run: error: cannot write {folder / 'x.npy'}: {reason}", proc.stderr
    assert set(folder.iterdir()) == before


@pytest.mark.cpp
def test_rstr_run_refuses_an_unwritable_out_in_one_line(rstr_run, pixel_dit_bundle, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "x.npy"
    proc = subprocess.run(
        [str(rstr_run), str(pixel_dit_bundle), "--out", str(out), "--class", "3", "--seed", "0"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.startswith(f"rstr-run: error: cannot write {out}: Not a directory;"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.cpp
def test_rstr_run_documents_and_takes_the_trust_option(rstr_run, pixel_dit_bundle, tmp_path):
    """Host code of TensorRT engines is off unless --trust-engine-host-code (the ONNX Runtime backends ignore it)."""
    usage = subprocess.run([str(rstr_run), "--help"], capture_output=True, text=True).stdout
    assert "--trust-engine-host-code" in usage and "whose author" in usage
    args = [str(rstr_run), str(pixel_dit_bundle), "--out", str(tmp_path / "x.npy"), "--class", "3", "--seed", "0"]
    assert subprocess.run([*args, "--trust-engine-host-code"], capture_output=True).returncode == 0


class _Payload:
    """Unpickling this writes a marker file: the proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_pickled_weights_are_never_loaded(model_dir, tmp_path, capsys, monkeypatch):
    import pickle

    model = shutil.copytree(model_dir, tmp_path / "model")
    marker = tmp_path / "payload-ran"
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.unlink()
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    code, err = _rstr(capsys, monkeypatch, "info", model)
    assert code == 1 and len(err.splitlines()) == 1 and "has pickled .bin weights only" in err, err
    assert not marker.exists()


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
