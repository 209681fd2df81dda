"""Hardening of what ``rstr`` reads and what every command writes: one-line errors, nothing left behind.

Broken model directories (copies of the tiny pixel DiT the shared bundle of tests/conftest.py was
built from), schedules, adapters and allocations must be refused in one line by the ``rstr``
command line, run in-process through its real entry point; pickled weights are never loaded.
Writes are atomic: a full disk or an unwritable output is one line and leaves nothing, and the
next build removes what a killed one left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hardening_support import run_cli, zero_adapter


# ------------------------------------------------------ rstr: model directories, schedules, adapters
@pytest.fixture(scope="module")
def model_dir(pixel_dit_bundle) -> Path:
    """The tiny pixel DiT the shared bundle was built from (transformer/, scheduler/, rstr.json)."""
    return Path(json.loads((pixel_dit_bundle / "manifest.json").read_text())["provenance"]["model"])


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    return zero_adapter(model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


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
