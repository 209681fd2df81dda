"""A corpus of bad bundles, each a small mutation of one good bundle, with the reason every reader must give.

:func:`make_corpus` copies the good bundle once per case and applies the case's mutation; the
case's ``reason`` is a fragment that the one error line of every reader (``Bundle.open`` /
``Pipeline.load``, ``rstr-export run``, ``rstr-export verify`` and the C++ ``rstr-run``) must
contain.  tests/test_hardening_bundles.py runs the corpus through all four and also checks that their
lines agree word for word once the bundle's path is taken out.

Areas: ``json`` (the manifest as a document), ``schema``, ``rules`` (what the schema cannot
state), ``files`` (paths, links, sizes, checksums) and ``graphs`` (the ONNX files against the
manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Edit = Callable[[dict, Path], Any]


@dataclass(frozen=True)
class Case:
    area: str
    reason: str
    edit: Edit  # edit(manifest dict, bundle copy); returning a str writes that text as manifest.json instead


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(m: dict, copy: Path, name: str) -> None:
    """Update ``files[name]`` to the file's current sha256 and size, as a careful forger would."""
    m["files"][name] = {"sha256": _sha(copy / name), "bytes": (copy / name).stat().st_size}


def _set(*path_and_value) -> Edit:
    *path, value = path_and_value

    def edit(m: dict, _: Path) -> None:
        *parents, last = path
        for key in parents:
            m = m[key]
        m[last] = value

    return edit


def _drop(*path) -> Edit:
    def edit(m: dict, _: Path) -> None:
        *parents, last = path
        for key in parents:
            m = m[key]
        del m[last]

    return edit


def _text(make: Callable[[dict], str]) -> Edit:
    return lambda m, _: make(m)


def _nested(m: dict) -> str:
    text = json.dumps(m)
    return text[:-1] + ', "summary": {"deep": ' + "[" * 100_000 + "]" * 100_000 + "}}"


def _number(m: dict, literal: str) -> str:
    m["plan"]["steps"][1]["coef_eps"] = 123456.0
    return json.dumps(m).replace("123456.0", literal)


def _not_utf8(m: dict) -> bytes:
    return json.dumps(m).replace('"ddim"', '"dd\udcffim"').encode("utf-8", "surrogateescape")


def _swap_graph(m: dict, copy: Path) -> None:
    shutil.copyfile(copy / "step_guided.onnx", copy / "step_single.onnx")
    rehash(m, copy, "step_single.onnx")


def _garbage_graph(m: dict, copy: Path) -> None:
    (copy / "step_single.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f not an onnx model")
    rehash(m, copy, "step_single.onnx")


def _resize(m: dict, _: Path) -> None:
    """Declare 4x4 latents everywhere, consistently: only the graph files still say 8x8."""

    def shrink(desc: dict) -> None:
        desc["shape"] = [d if i < 2 else 4 for i, d in enumerate(desc["shape"])]

    shrink(m["sample"])
    m["decoder"]["size"] = 4  # the pixels decoder's images are the latents
    for graph in m["graphs"].values():
        for desc in graph["inputs"] + graph["outputs"]:
            if len(desc["shape"]) == 4:
                shrink(desc)


def _labels_as_floats(m: dict, _: Path) -> None:
    m["conditioning"]["inputs"][0]["dtype"] = "float32"
    m["graphs"]["denoiser"]["inputs"][2]["dtype"] = "float32"


def _external_data(m: dict, copy: Path) -> None:
    import onnx

    model = onnx.load(str(copy / "denoiser.onnx"))  # its weights moved to a file of their own that files does not list
    onnx.save(model, str(copy / "denoiser.onnx"), save_as_external_data=True, location="denoiser.weights", size_threshold=0)
    rehash(m, copy, "denoiser.onnx")


def _outside_file(copy: Path, name: str, data: bytes) -> Path:
    outside = copy.parent / f"{copy.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / name).write_bytes(data)
    return outside / name


def _link_report(m: dict, copy: Path) -> None:
    target = _outside_file(copy, "secret.txt", b"a file outside the bundle\n")
    (copy / "report.md").unlink()
    (copy / "report.md").symlink_to(target)
    rehash(m, copy, "report.md")


def _link_graph(m: dict, copy: Path) -> None:
    target = _outside_file(copy, "denoiser.onnx", (copy / "denoiser.onnx").read_bytes())
    (copy / "denoiser.onnx").unlink()
    (copy / "denoiser.onnx").symlink_to(target)


def _link_folder(m: dict, copy: Path) -> None:
    target = _outside_file(copy, "notes.md", b"notes\n").parent
    (copy / "docs").symlink_to(target, target_is_directory=True)
    rehash(m, copy, "docs/notes.md")


def _link_manifest(m: dict, copy: Path) -> None:
    target = _outside_file(copy, "manifest.json", json.dumps(m).encode())
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to(target)


def _corrupt(m: dict, copy: Path) -> None:
    data = bytearray((copy / "step_single.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "step_single.onnx").write_bytes(bytes(data))


def _unlisted_engine(m: dict, copy: Path) -> None:
    (copy / "engines").mkdir()
    (copy / "engines" / "denoiser.plan").write_bytes(b"plan")
    m["engines"] = [{"graph": "denoiser", "file": "engines/denoiser.plan"}]


def _step(i: int, **values) -> Edit:
    return lambda m, _: m["plan"]["steps"][i].update(values)


CASES: dict[str, Case] = {
    # The manifest as a document.
    "json-array": Case("json", "manifest.json must hold a JSON object (got array)", _text(lambda m: "[]")),
    "json-truncated": Case("json", "manifest.json is not valid JSON", _text(lambda m: json.dumps(m)[:-10])),
    "json-nested-1e5": Case("json", "manifest.json is not valid JSON", _text(_nested)),
    "json-nan-coefficient": Case("json", "manifest.json is not valid JSON", _text(lambda m: _number(m, "NaN"))),
    "json-infinite-coefficient": Case("json", "manifest.json is not valid JSON", _text(lambda m: _number(m, "1e999"))),
    "json-not-utf8": Case("json", "manifest.json is not valid JSON", _text(_not_utf8)),
    "format-other": Case("json", 'format is "other", not "rstr.bundle"', _set("format", "other")),
    "format-missing": Case("json", "format is missing; this is not an rstr bundle", _drop("format")),
    "version-2": Case("json", "version is 2; this runtime reads version 1", _set("version", 2)),
    "version-float": Case("json", "version is 1.0; this runtime reads version 1", _set("version", 1.0)),
    # The schema.
    "missing-graphs": Case("schema", "missing field(s) graphs", _drop("graphs")),
    "missing-outputs": Case("schema", "graphs.denoiser: missing field(s) outputs", _drop("graphs", "denoiser", "outputs")),
    "files-entry-string": Case(
        "schema", 'files["denoiser.onnx"] must be an object (got string)', _set("files", "denoiser.onnx", "x")
    ),
    "files-array": Case("schema", "files must be an object (got array)", _set("files", [])),
    "batch-negative": Case("schema", "batch is -1; it must be at least 1", _set("batch", -1)),
    "batch-float": Case("schema", "batch must be an integer (got number)", _set("batch", 2.0)),
    "guided-string": Case("schema", "plan.steps[0].guided must be a boolean (got string)", _step(0, guided="false")),
    "dimension-zero": Case("schema", "sample.shape[2] is 0; it must be at least 1", _set("sample", "shape", [2, 1, 0, 8])),
    "dtype-float16": Case("schema", 'sample.dtype is "float16"; expected one of', _set("sample", "dtype", "float16")),
    "unknown-field": Case("schema", "unknown field(s) colour", _set("colour", "blue")),
    "steps-empty": Case("schema", "plan.steps has 0 item(s); it must have at least 1", _set("plan", "steps", [])),
    # What the schema cannot state.
    "guided-step-at-b": Case("rules", "plan.steps[0].batch is 2 but a guided step runs 4 rows at batch 2", _step(0, batch=2)),
    "unguided-step-at-2b": Case("rules", "plan.steps[2].batch is 4 but an unguided step runs 2 rows", _step(2, batch=4)),
    "step-out-of-order": Case("rules", "plan.steps[1].index is 5; steps are listed in order from 0", _step(1, index=5)),
    "guided-without-scale": Case("rules", "plan.steps[0].scale is null on a guided step", _step(0, scale=None)),
    "unguided-with-scale": Case("rules", "plan.steps[2].scale is set on an unguided step", _step(2, scale=1.5)),
    "num-steps": Case("rules", "plan.num_steps is 5 but the steps give 4", _set("plan", "num_steps", 5)),
    "passes-per-image": Case("rules", "plan.passes_per_image is 8 but the steps give 6", _set("plan", "passes_per_image", 8)),
    "sample-1e10-elements": Case(
        "rules",
        "sample.shape [2, 1, 100000, 50000] has more than 2147483647 elements at 2 rows",
        _set("sample", "shape", [2, 1, 100_000, 50_000]),
    ),
    "sample-not-batch": Case(
        "rules", "sample.shape [3, 1, 8, 8] must start with the batch, 2", _set("sample", "shape", [3, 1, 8, 8])
    ),
    "sample-int64": Case("rules", 'sample.dtype is "int64"; the latents are float32', _set("sample", "dtype", "int64")),
    "symbolic-inner-axis": Case(
        "rules",
        'graphs.denoiser.inputs[0].shape[1] is "c"; only axis 0 (the batch) may be symbolic',
        lambda m, _: m["graphs"]["denoiser"]["inputs"][0].update(shape=["batch", "c", 8, 8]),
    ),
    "no-unconditional-rule": Case(
        "rules", "conditioning.unconditional has no rule for input 'class_labels'", _set("conditioning", "unconditional", {})
    ),
    "null-class-out-of-range": Case(
        "rules",
        "conditioning.unconditional.class_labels.fill must be a class in 0..10",
        _set("conditioning", "unconditional", "class_labels", {"fill": -1}),
    ),
    "null-class-fraction": Case(
        "rules",
        "conditioning.unconditional.class_labels.fill must be an integer",
        _set("conditioning", "unconditional", "class_labels", {"fill": 9.5}),
    ),
    "decoder-range-reversed": Case(
        "rules", "decoder.range must be two finite numbers [lo, hi] with lo < hi", _set("decoder", "range", [1.0, -1.0])
    ),
    "pixels-decoder-shape": Case(
        "rules",
        "a pixels decoder of 1 x 6 x 6 images needs samples [1, 6, 6] or, 2x2-packed, [9, 4]; sample.shape is [2, 1, 8, 8]",
        _set("decoder", "size", 6),
    ),
    "denoiser-without-timestep": Case(
        "rules",
        "graphs.denoiser.inputs are [class_labels, sample]; the runtime binds [class_labels, sample, timestep]",
        lambda m, _: m["graphs"]["denoiser"].update(
            inputs=[d for d in m["graphs"]["denoiser"]["inputs"] if d["name"] != "timestep"]
        ),
    ),
    "step-sample-shape": Case(
        "rules",
        "graphs.step_single tensor 'sample' is float32 [batch, 1, 4, 4]; the runtime binds float32 [rows, 1, 8, 8]",
        lambda m, _: m["graphs"]["step_single"]["inputs"][0].update(shape=["batch", 1, 4, 4]),
    ),
    "scale-shape": Case(
        "rules",
        "graphs.step_guided tensor 'scale' is float32 [2]; the runtime binds float32 [1]",
        lambda m, _: m["graphs"]["step_guided"]["inputs"][2].update(shape=[2]),
    ),
    "multistep-without-history-graphs": Case(
        "rules",
        "graphs.step_guided.inputs are [coef_eps, coef_sample, model_output, sample, scale]; the runtime binds "
        "[coef_eps, coef_sample, history, model_output, sample, scale]",
        _set("plan", "steps", 1, "coef_eps", [-0.5, 0.25]),
    ),
    "coefficients-empty": Case("schema", "plan.steps[1].coef_sample", _set("plan", "steps", 1, "coef_sample", [])),
    "graph-file-unlisted": Case(
        "rules", "graphs.step_single.file 'step_single.onnx' is not listed in files", _drop("files", "step_single.onnx")
    ),
    "engine-file-unlisted": Case("rules", "engines[0].file 'engines/denoiser.plan' is not listed in files", _unlisted_engine),
    # The files.
    "entry-dotdot": Case(
        "files",
        "files entry '../outside.bin' has a '..' component",
        _set("files", "../outside.bin", {"sha256": "0" * 64, "bytes": 1}),
    ),
    "entry-absolute": Case(
        "files", "files entry '/etc/hostname' is an absolute path", _set("files", "/etc/hostname", {"sha256": "0" * 64})
    ),
    "entry-dot": Case(
        "files", "files entry './report.md' is not a plain relative path", _set("files", "./report.md", {"sha256": "0" * 64})
    ),
    "missing-file": Case(
        "files", "file 'step_guided.onnx' listed in manifest.json is missing", lambda m, c: (c / "step_guided.onnx").unlink()
    ),
    "directory-listed": Case(
        "files", "file 'stages' listed in manifest.json is missing", _set("files", "stages", {"sha256": "0" * 64})
    ),
    "checksum": Case("files", "file 'step_single.onnx' fails its checksum", _corrupt),
    "bytes-mismatch": Case(
        "files", "bytes, manifest.json says 1 (corrupt or truncated", lambda m, _: m["files"]["report.md"].update(bytes=1)
    ),
    "symlink-report-outside": Case("files", "file 'report.md' is or lies under a symbolic link", _link_report),
    "symlink-graph-outside": Case("files", "file 'denoiser.onnx' is or lies under a symbolic link", _link_graph),
    "symlink-folder": Case("files", "file 'docs/notes.md' is or lies under a symbolic link", _link_folder),
    "symlink-manifest": Case("files", "manifest.json is a symbolic link; bundles hold plain files", _link_manifest),
    # The graphs against the manifest.
    "graph-swapped": Case(
        "graphs",
        "graphs.step_single: step_single.onnx has inputs [coef_eps, coef_sample, model_output, sample, scale] but the "
        "manifest describes [coef_eps, coef_sample, model_output, sample]",
        _swap_graph,
    ),
    "graph-not-onnx": Case("graphs", "graphs.step_single: step_single.onnx is not a readable ONNX model", _garbage_graph),
    "graph-other-shape": Case(
        "graphs",
        "graphs.denoiser: denoiser.onnx input 'sample' has shape [batch, 1, 8, 8] in the graph but [batch, 1, 4, 4] in the manifest",
        _resize,
    ),
    "graph-other-dtype": Case(
        "graphs",
        "graphs.denoiser: denoiser.onnx input 'class_labels' is int64 in the graph but float32 in the manifest",
        _labels_as_floats,
    ),
    "graph-external-data-unlisted": Case(
        "graphs",
        "graphs.denoiser: denoiser.onnx keeps weights in 'denoiser.weights', which is not listed in files",
        _external_data,
    ),
}


def make_case(good: Path, name: str, dest: Path) -> Path:
    """A copy of ``good`` at ``dest`` with case ``name`` applied."""
    shutil.copytree(good, dest, symlinks=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    text = CASES[name].edit(manifest, dest)
    if (dest / "manifest.json").is_symlink():
        return dest
    if text is None:
        text = json.dumps(manifest, indent=1)
    (dest / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return dest


def make_corpus(good: Path, root: Path) -> dict[str, Path]:
    """Every case of :data:`CASES` as a bundle under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return {name: make_case(good, name, root / name) for name in CASES}


def normalise(line: str, bundle: Path) -> str:
    """A reader's error line without its program prefix and the bundle's path, and without the parser's
    own detail of invalid JSON or an unreadable ONNX file (each language words those differently)."""
    for prefix in ("rstr-run: error: ", "rstr-export: error: "):
        line = line.removeprefix(prefix)
    where = os.fspath(bundle)
    line = line.replace(f"bundle {where}: ", "").replace(f"{where}{os.sep}", "")
    for detail in ("is not valid JSON", "is not a readable ONNX model"):
        if detail in line:
            line = line[: line.index(detail) + len(detail)]
    return line
