"""Hardening: one bundle validator behind every reader, and bad bundles refused the same way by all four.

The shared corpus (tests/bad_bundles.py) is built in the test session from the good pixel-space
DiT bundle (tests/conftest.py).  Each bad bundle goes through ``Pipeline.load``, ``rstr-export
run``, ``rstr-export verify`` (command lines run in-process, through their real entry point) and
the C++ ``rstr-run``: each must refuse it in one line naming the case's reason, and the lines
must agree word for word once the bundle's path is taken out.
"""

from __future__ import annotations

import json
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
