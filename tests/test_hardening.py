"""Hardening: one bundle validator behind every reader, and bad bundles refused the same way by all four.

The shared corpus (tests/bad_bundles.py) is built in the test session from the good pixel-space
DiT bundle (tests/conftest.py).  Each bad bundle goes through ``Pipeline.load``, ``rstr-export
run``, ``rstr-export verify`` (command lines run in-process, through their real entry point) and
the C++ ``rstr-run``: each must refuse it in one line naming the case's reason, and the lines
must agree word for word once the bundle's path is taken out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bad_bundles import CASES, make_corpus, normalise

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
