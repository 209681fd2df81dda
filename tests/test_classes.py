"""Bundles with a class table (the digits reference models of the text families): class labels in, in every reader."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rstr.engines.bundle import Bundle
from rstr.engines.pipeline import Pipeline

from rstr.errors import BundleError, RstrError


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_class_labels_are_the_class_tables_rows(packed_pixel_bundle):
    """{"class_labels": [3, 7]} runs exactly as the table's rows for 3 and 7 with its empty prompt as negatives."""
    m = Bundle.open(packed_pixel_bundle).manifest
    assert m.classes is not None and m.classes.num_classes == 10 and m.classes.negative_row == 10
    assert m.verification is not None and m.verification.graphs["class_embeddings"] == 0.0  # a gather: exact
    cond, uncond = (_arrays(packed_pixel_bundle.parent / f"{n}.npz") for n in ("cond", "uncond"))
    with Pipeline.load(packed_pixel_bundle, backend="onnxruntime") as pipe:
        by_class = pipe({"class_labels": np.array([3, 7])}, seed=5)
        by_rows = pipe(cond, uncond=uncond, seed=5)
        with pytest.raises(RstrError, match=re.escape("class label 10 is out of range; this model has classes 0..9")):
            pipe({"class_labels": np.array([3, 10])}, seed=5)
        with pytest.raises(
            RstrError, match=re.escape("class_labels must be one integer per row (2 for this bundle), got float64 [2]")
        ):
            pipe({"class_labels": np.array([3.0, 7.0])}, seed=5)
    np.testing.assert_array_equal(by_class.latents, by_rows.latents)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rstr.export.cli", "run", "--backend", "onnxruntime", *args], capture_output=True, text=True
    )


def test_run_with_class_makes_the_png_of_the_tables_rows(packed_pixel_bundle, tmp_path):
    cond, uncond = (_arrays(packed_pixel_bundle.parent / f"{n}.npz") for n in ("cond", "uncond"))
    np.savez(tmp_path / "both.npz", **cond, **{f"uncond_{k}": v for k, v in uncond.items()})
    by_class = run_cli(str(packed_pixel_bundle), "--class", "3,7", "--out", str(tmp_path / "class.png"))
    by_rows = run_cli(str(packed_pixel_bundle), "--cond", str(tmp_path / "both.npz"), "--out", str(tmp_path / "rows.png"))
    assert by_class.returncode == 0 and by_rows.returncode == 0, by_class.stderr + by_rows.stderr
    assert (tmp_path / "class.png").read_bytes() == (tmp_path / "rows.png").read_bytes()
    bad = run_cli(str(packed_pixel_bundle), "--class", "3,12", "--out", str(tmp_path / "bad.png"))
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "rstr-export: error: class label 12 is out of range; this model has classes 0..9"
    ], bad.stderr
    assert not (tmp_path / "bad.png").exists()


def _drop_classes(m: dict) -> None:
    del m["classes"]


def _wrong_output(m: dict) -> None:
    out = next(d for d in m["graphs"]["class_embeddings"]["outputs"] if d["name"] == "encoder_hidden_states")
    out["shape"] = ["batch", 3, out["shape"][2]]


CASES = {
    "negative-row": (
        lambda m: m["classes"].update(negative_row=11),
        "classes.negative_row 11 is not a row of the table (0..10, the classes then the empty prompt)",
    ),
    "stray-graph": (_drop_classes, "graphs.class_embeddings is run by neither the decoder, a text encoder nor the class table"),
    "graph-missing": (
        lambda m: m["classes"].update(graph="nope"),
        "classes.graph 'nope' is not one of the graphs beside the plan's",
    ),
    "output-shape": (_wrong_output, "graphs.class_embeddings tensor 'encoder_hidden_states' is float32 [batch, 3, 64]"),
    "unknown-key": (
        lambda m: m["classes"].update(rows=11),
        "classes: unknown field(s) rows; allowed: graph, negative_row, num_classes",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_class_section_is_refused_in_the_same_words_by_every_reader(packed_pixel_bundle, tmp_path, case, request):
    edit, words = CASES[case]
    copy = tmp_path / case
    shutil.copytree(packed_pixel_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as err:
        Bundle.open(copy)
    assert words in str(err.value)
    proc = run_cli(str(copy), "--class", "3,7", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
    rstr_run = request.getfixturevalue("rstr_run")  # skips where the C++ runtime cannot be built
    proc = subprocess.run(
        [str(rstr_run), str(copy), "--seed", "0", "--out", str(tmp_path / "x.npy")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
