"""The rules of a bundle that its JSON Schema cannot state, checked by every reader.

Three layers, run in this order by :meth:`rstr.engines.bundle.Bundle.open` (and by the C++
runtime's ``Bundle::open`` in engines/cpp/src/validate.cpp and validate_files.cpp, with the same rules in the same
order and the same words):

1. :func:`document_problem`: a schema-valid ``manifest.json`` must also make sense: the sample
   is float32 ``[B, ...]``; only axis 0 of a tensor may be symbolic; no tensor holds more than
   :data:`MAX_ELEMENTS` values at 2B rows; every conditioning input has an unconditional rule
   (an integer fill within the class range for class labels); steps are in order, each
   guided step has a scale and runs 2B rows, each unguided step none and B rows, every number
   is finite and the step counts agree; the decoder range is ``lo < hi``; each graph declares
   exactly the tensors the plan walk binds, shaped like the sample and one another (the step
   graphs of a multistep plan of history k also ``history``/``next_history`` and ``[k + 1]``
   coefficients); the other graphs are the VAE decoder's, the text encoders' and the class
   table's (``class_labels`` in, every conditioning input out, ``negative_row`` a row of the
   table), each named by its user and declaring the tensors that user binds; every graph, tokenizer and engine
   file is listed in ``files``.
2. :func:`file_problems`: every ``files`` entry is a plain relative path inside the bundle with
   no symbolic link on the way, exists, and has the listed size and sha256.
3. :func:`graph_file_problem`: each ONNX graph file has the inputs and outputs the manifest
   describes (names, dtypes, shapes) and keeps external weights only in listed files.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from rstr.engines.onnx_io import GraphTensor, OnnxFormatError, read_graph_io

MAX_ELEMENTS = 2**31 - 1  # values in one tensor at 2B rows (int32 indexing in ONNX Runtime and TensorRT kernels)
GRAPHS = ("denoiser", "step_guided", "step_single")
STEP_INPUTS = {
    "step_guided": ("sample", "model_output", "scale", "coef_sample", "coef_eps"),
    "step_single": ("sample", "model_output", "coef_sample", "coef_eps"),
}
STEP_OUTPUTS = ("next_sample", "next_sample_pair")
SCALARS = ("scale", "coef_sample", "coef_eps")  # [1], and the coefficients [k + 1] in a plan of history k


def coefficients(value: Any) -> list[Any]:
    """A step's ``coef_sample`` or ``coef_eps`` as a list: one number, or ``[current, previous, ...]``."""
    return list(value) if isinstance(value, list) else [value]


def plan_history(plan: Mapping[str, Any]) -> int:
    """The past steps a plan's updates read: the longest coefficient list less one (0 for one-step schedulers)."""
    return max(len(coefficients(s[key])) - 1 for s in plan["steps"] for key in ("coef_sample", "coef_eps"))


def shape_text(shape: Sequence[int | str | None]) -> str:
    """``[batch, 1, 8, 8]``: the spelling both readers use in messages (``?`` for an unknown dimension)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------- the document
def document_problem(data: Mapping[str, Any]) -> str | None:
    """The first rule a schema-valid manifest breaks, in words, or None."""
    for check in (_sample, _conditioning, _plan, _decoder, _graphs, _other_graphs, _listed):
        problem = check(data)
        if problem is not None:
            return problem
    return None


def _tensor_problem(at: str, desc: Mapping[str, Any], batch: int) -> str | None:
    """Only axis 0 symbolic; at most MAX_ELEMENTS values with a symbolic axis 0 at 2B rows."""
    shape = desc["shape"]
    for i, d in enumerate(shape[1:], start=1):
        if isinstance(d, str):
            return f'{at}.shape[{i}] is "{d}"; only axis 0 (the batch) may be symbolic'
    rows = 2 * batch if isinstance(shape[0], str) else shape[0]
    count = rows
    for d in shape[1:]:
        count *= d
    if count > MAX_ELEMENTS:
        return f"{at}.shape {shape_text(shape)} has more than {MAX_ELEMENTS} elements at {rows} rows"
    return None


def _sample(data: Mapping[str, Any]) -> str | None:
    sample, batch = data["sample"], data["batch"]
    if sample["dtype"] != "float32":
        return f'sample.dtype is "{sample["dtype"]}"; the latents are float32'
    if sample["shape"][0] != batch:
        return f"sample.shape {shape_text(sample['shape'])} must start with the batch, {batch}"
    return _tensor_problem("sample", sample, batch)


def _conditioning(data: Mapping[str, Any]) -> str | None:
    cond, batch = data["conditioning"], data["batch"]
    num_classes = cond.get("num_classes")
    for i, desc in enumerate(cond["inputs"]):
        at = f"conditioning.inputs[{i}]"
        if not isinstance(desc["shape"][0], str) and desc["shape"][0] != batch:
            return f"{at}.shape starts with {desc['shape'][0]} but the bundle's batch is {batch}"
        problem = _tensor_problem(at, desc, batch)
        if problem is not None:
            return problem
        name = desc["name"]
        rule = cond["unconditional"].get(name)
        if rule is None:
            return f'conditioning.unconditional has no rule for input \'{name}\'; give {{"fill": value}} or "required"'
        if isinstance(rule, dict):
            fill, at = rule["fill"], f"conditioning.unconditional.{name}.fill"
            if not _finite(fill):
                return f"{at} is not a finite number"
            if desc["dtype"] == "int64" and fill != int(fill):
                return f"{at} must be an integer ('{name}' is int64)"
            if desc["dtype"] == "int64" and num_classes is not None and not 0 <= fill <= num_classes:
                return f"{at} must be a class in 0..{num_classes} (the null class is usually {num_classes})"
    return None


def _plan(data: Mapping[str, Any]) -> str | None:
    plan, batch = data["plan"], data["batch"]
    for key in ("init_noise_sigma", "compute_fraction"):
        if not _finite(plan[key]):
            return f"plan.{key} is not a finite number"
    guided_steps = 0
    for i, step in enumerate(plan["steps"]):
        at = f"plan.steps[{i}]"
        if step["index"] != i:
            return f"{at}.index is {step['index']}; steps are listed in order from 0"
        for key in ("timestep", "model_timestep", "coef_sample", "coef_eps", "scale"):
            values = coefficients(step[key]) if key.startswith("coef") else [step[key]]
            if any(v is not None and not _finite(v) for v in values):
                return f"{at}.{key} is not a finite number"
        guided = step["guided"]
        guided_steps += guided
        if guided and step["scale"] is None:
            return f"{at}.scale is null on a guided step; a guided step needs its guidance scale"
        if not guided and step["scale"] is not None:
            return f"{at}.scale is set on an unguided step; an unguided step takes none (null)"
        rows = 2 * batch if guided else batch
        if step["batch"] != rows:
            kind = "a guided" if guided else "an unguided"
            return f"{at}.batch is {step['batch']} but {kind} step runs {rows} rows at batch {batch}"
    steps = len(plan["steps"])
    for key, value in (("num_steps", steps), ("passes_per_image", steps + guided_steps)):
        if plan[key] != value:
            return f"plan.{key} is {plan[key]} but the steps give {value}"
    return None


def _decoder(data: Mapping[str, Any]) -> str | None:
    decoder = data.get("decoder")
    if decoder is None:
        return None
    lo, hi = decoder["range"]
    if not (_finite(lo) and _finite(hi) and lo < hi):
        return "decoder.range must be two finite numbers [lo, hi] with lo < hi"
    if decoder["kind"] == "pixels":
        c, s, rest = decoder["channels"], decoder["size"], list(data["sample"]["shape"][1:])
        if rest != [c, s, s] and not (s % 2 == 0 and rest == [s * s // 4, 4 * c]):
            return (
                f"a pixels decoder of {c} x {s} x {s} images needs samples [{c}, {s}, {s}] or, 2x2-packed, "
                f"[{s * s // 4}, {4 * c}]; sample.shape is {shape_text(data['sample']['shape'])}"
            )
    return None


def _graph_contract(data: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The names the plan walk binds in each graph: (inputs, outputs)."""
    cond = tuple(d["name"] for d in data["conditioning"]["inputs"])
    past_in, past_out = (("history",), ("next_history",)) if plan_history(data["plan"]) else ((), ())
    return {
        "denoiser": (("sample", "timestep", *cond), ("model_output",)),
        "step_guided": ((*STEP_INPUTS["step_guided"], *past_in), (*STEP_OUTPUTS, *past_out)),
        "step_single": ((*STEP_INPUTS["step_single"], *past_in), (*STEP_OUTPUTS, *past_out)),
    }


def _graphs(data: Mapping[str, Any]) -> str | None:
    batch = data["batch"]
    contract = _graph_contract(data)
    sample = ("float32", tuple(data["sample"]["shape"][1:]))
    cond = {d["name"]: (d["dtype"], tuple(d["shape"][1:])) for d in data["conditioning"]["inputs"]}
    out: tuple[str, tuple[Any, ...]] = ("float32", ())  # the denoiser's model_output, read first (GRAPHS order)
    k = plan_history(data["plan"])
    past = ("float32", (k, 2, *sample[1]))  # history [rows, k, 2, ...]: past (sample, model output) pairs
    for name in GRAPHS:
        graph = data["graphs"][name]
        for kind, expected in zip(("inputs", "outputs"), contract[name]):
            descs = graph[kind]
            for i, desc in enumerate(descs):
                problem = _tensor_problem(f"graphs.{name}.{kind}[{i}]", desc, batch)
                if problem is not None:
                    return problem
            names = [d["name"] for d in descs]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                return f"graphs.{name}.{kind} names '{twice[0]}' twice"
            if sorted(names) != sorted(expected):
                return f"graphs.{name}.{kind} are [{', '.join(sorted(names))}]; the runtime binds [{', '.join(sorted(expected))}]"
        tensors = {d["name"]: d for d in graph["inputs"] + graph["outputs"]}
        if name == "denoiser":
            out = ("float32", tuple(tensors["model_output"]["shape"][1:]))
            wanted = {"sample": sample, "timestep": ("float32", ()), "model_output": out, **cond}
        else:
            wanted = {"sample": sample, "next_sample": sample, "next_sample_pair": sample, "model_output": out}
            wanted.update({"history": past, "next_history": past})
        for tensor, desc in sorted(tensors.items()):
            if tensor in SCALARS:
                n = 1 if tensor == "scale" else k + 1
                if desc["dtype"] != "float32" or list(desc["shape"]) != [n]:
                    return f"graphs.{name} tensor '{tensor}' is {desc['dtype']} {shape_text(desc['shape'])}; the runtime binds float32 [{n}]"
                continue
            dtype, rest = wanted[tensor]
            if desc["dtype"] != dtype or tuple(desc["shape"][1:]) != rest:
                return (
                    f"graphs.{name} tensor '{tensor}' is {desc['dtype']} {shape_text(desc['shape'])}; "
                    f"the runtime binds {dtype} {shape_text(('rows', *rest))}"
                )
    return None


def graph_users(data: Mapping[str, Any]) -> dict[str, str]:
    """The graphs beside the plan's and who runs each: ``decoder``, ``text.encoders[i]`` or ``classes`` (unchecked names)."""
    users = {}
    decoder, text = data.get("decoder"), data.get("text")
    if decoder is not None and decoder.get("graph") is not None:
        users[decoder["graph"]] = "decoder"
    for i, encoder in enumerate(text["encoders"] if text is not None else ()):
        users.setdefault(encoder["graph"], f"text.encoders[{i}]")
    if data.get("classes") is not None:
        users.setdefault(data["classes"]["graph"], "classes")
    return users


def _other_graphs(data: Mapping[str, Any]) -> str | None:
    """The VAE decoder's, the text encoders' and the class table's graphs: each named once, beside the plan's, bound as
    its user binds it."""
    graphs, batch, users = data["graphs"], data["batch"], graph_users(data)
    decoder, text = data.get("decoder"), data.get("text")
    if decoder is not None and decoder["kind"] == "vae" and decoder.get("graph") is None:
        return "decoder.graph is missing; a vae decoder names its graph"
    if decoder is not None and decoder["kind"] != "vae" and decoder.get("graph") is not None:
        return f'decoder.graph is set on a "{decoder["kind"]}" decoder; only a vae decoder runs a graph'
    cond = {d["name"]: d for d in data["conditioning"]["inputs"]}
    wanted: dict[str, dict[str, tuple[str, tuple[Any, ...] | None]]] = {}  # graph: tensor: (dtype, dims past axis 0)
    for name, user in users.items():
        if name in GRAPHS or name not in graphs:
            return f"{user}.graph '{name}' is not one of the graphs beside the plan's"
    if decoder is not None and decoder.get("graph") is not None:
        wanted[decoder["graph"]] = {"latents": ("float32", tuple(data["sample"]["shape"][1:])), "images": ("float32", None)}
    for i, encoder in enumerate(text["encoders"] if text is not None else ()):
        at, name = f"text.encoders[{i}]", encoder["graph"]
        if users[name] != at:
            return f"{at}.graph '{name}' is named twice; every text encoder has a graph of its own"
        if encoder["tokenizer"] not in data["files"]:
            return f"{at}.tokenizer '{encoder['tokenizer']}' is not listed in files (it would be loaded unchecked)"
        for key in ("output", "mask"):
            if encoder.get(key) is not None and encoder[key] not in cond:
                return f"{at}.{key} '{encoder[key]}' is not a conditioning input"
        ids = ("int64", (encoder["max_length"],))
        wanted[name] = {"input_ids": ids, "embeddings": ("float32", tuple(cond[encoder["output"]]["shape"][1:]))}
        if encoder.get("mask") is not None:
            wanted[name]["attention_mask"] = ids
    classes = data.get("classes")
    if classes is not None:
        name, n = classes["graph"], classes["num_classes"]
        if users[name] != "classes":
            return f"classes.graph '{name}' is {users[name]}'s too; the class table has a graph of its own"
        if classes["negative_row"] > n:
            return f"classes.negative_row {classes['negative_row']} is not a row of the table (0..{n}, the classes then the empty prompt)"
        if "class_labels" in cond:
            return "classes is set but the denoiser takes class_labels itself; a class table fills the other inputs"
        wanted[name] = {"class_labels": ("int64", ()), **{c: (d["dtype"], tuple(d["shape"][1:])) for c, d in cond.items()}}
    for name in sorted(set(graphs) - set(GRAPHS)):
        if name not in wanted:
            return f"graphs.{name} is run by neither the decoder, a text encoder nor the class table"
        tensors = [d for kind in ("inputs", "outputs") for d in graphs[name][kind]]
        for desc in tensors:
            problem = _tensor_problem(f"graphs.{name} tensor '{desc['name']}'", desc, batch)
            if problem is not None:
                return problem
        have, want = sorted(d["name"] for d in tensors), sorted(wanted[name])
        if have != want:
            return f"graphs.{name} has tensors [{', '.join(have)}]; its user binds [{', '.join(want)}]"
        for desc in tensors:
            dtype, rest = wanted[name][desc["name"]]
            shape = desc["shape"]
            if desc["dtype"] != dtype or (len(shape) != 4 if rest is None else tuple(shape[1:]) != rest):
                bound = shape_text(("rows", "H", "W", "C") if rest is None else ("rows", *rest))
                return f"graphs.{name} tensor '{desc['name']}' is {desc['dtype']} {shape_text(shape)}; its user binds {dtype} {bound}"
    return None


def _listed(data: Mapping[str, Any]) -> str | None:
    files = data["files"]
    for name in [*GRAPHS, *sorted(set(data["graphs"]) - set(GRAPHS))]:
        file = data["graphs"][name]["file"]
        if file not in files:
            return f"graphs.{name}.file '{file}' is not listed in files (it would be loaded unchecked)"
    for i, engine in enumerate(data.get("engines") or ()):
        if engine["file"] not in files:
            return f"engines[{i}].file '{engine['file']}' is not listed in files (it would be loaded unchecked)"
    return None


# ------------------------------------------------------------------------------------ the files
def entry_problem(name: str) -> str | None:
    """Why a ``files`` key is not a plain relative POSIX path inside the bundle, or None."""
    if not name:
        return "files has an empty path"
    if PurePosixPath(name).is_absolute():
        return f"files entry '{name}' is an absolute path; entries must be relative to the bundle"
    parts = name.split("/")
    if ".." in parts:
        return f"files entry '{name}' has a '..' component; entries must stay inside the bundle"
    if any(p in ("", ".") for p in parts) or "\\" in name or "\0" in name:
        return f"files entry '{name}' is not a plain relative path (no empty, '.' or backslash components)"
    return None


def member_problem(root: Path, name: str) -> str | None:
    """Why ``root/name`` is not a plain file reached without symbolic links, or None."""
    path = root
    for part in name.split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return f"file '{name}' listed in manifest.json is missing"
        if stat.S_ISLNK(mode):
            return f"file '{name}' is or lies under a symbolic link; bundles hold plain files"
    if not stat.S_ISREG(mode):
        return f"file '{name}' listed in manifest.json is missing"
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_problems(root: Path, files: Mapping[str, Any], verify_checksums: bool = True) -> list[str]:
    """Every problem of the listed files (``{name: FileEntry}``), in name order."""
    problems = []
    for name in sorted(files):
        problem = entry_problem(name) or member_problem(root, name)
        if problem is None and verify_checksums:
            try:
                problem = _content_problem(root, name, files[name])
            except OSError:
                problem = f"file '{name}' cannot be read"
        if problem is not None:
            problems.append(problem)
    return problems


def _content_problem(root: Path, name: str, entry: Any) -> str | None:
    size = (root / name).stat().st_size
    if entry.bytes is not None and size != entry.bytes:
        return f"file '{name}' has {size} bytes, manifest.json says {entry.bytes} (corrupt or truncated; re-export or re-copy the bundle)"
    actual, want = sha256_file(root / name), entry.sha256.lower()
    if actual != want:
        return (
            f"file '{name}' fails its checksum (sha256 {actual[:12]}..., manifest.json says {want[:12]}...; "
            "corrupt or modified: re-export or re-copy the bundle)"
        )
    return None


# ----------------------------------------------------------------------------------- the graphs
def _dims_fit(graph: Sequence[int | str | None], manifest: Sequence[int | str], rows: tuple[int, int]) -> bool:
    """A graph's shape fits the manifest's: same rank; a fixed graph dimension equals the manifest's number,
    or on a symbolic batch axis one of the plan's row counts ``rows`` (B, 2B); open graph dimensions
    (named or unknown) fit anything."""
    if len(graph) != len(manifest):
        return False
    for axis, (g, m) in enumerate(zip(graph, manifest)):
        if isinstance(g, int) and g != m and not (axis == 0 and isinstance(m, str) and g in rows):
            return False
    return True


def graph_file_problem(root: Path, name: str, graph: Any, files: Mapping[str, Any], batch: int) -> str | None:
    """Whether the ONNX file of graph ``name`` (a :class:`~rstr.engines.manifest.Graph`) is what the manifest
    of a bundle of batch ``batch`` describes."""
    rows = (batch, 2 * batch)
    at = f"graphs.{name}: {graph.file}"
    try:
        io = read_graph_io(root / graph.file)
    except (OnnxFormatError, OSError) as err:
        return f"{at} is not a readable ONNX model ({err})"
    for kind, declared, actual in (
        ("inputs", graph.inputs, [t for t in io.inputs if t.name not in io.initializers]),
        ("outputs", graph.outputs, list(io.outputs)),
    ):
        have: dict[str, GraphTensor] = {t.name: t for t in actual}
        if sorted(have) != sorted(d.name for d in declared):
            return (
                f"{at} has {kind} [{', '.join(sorted(have))}] but the manifest describes "
                f"[{', '.join(sorted(d.name for d in declared))}]"
            )
        for desc in declared:
            t = have[desc.name]
            if t.dtype != desc.dtype:
                return f"{at} {kind[:-1]} '{desc.name}' is {t.dtype} in the graph but {desc.dtype} in the manifest"
            if not _dims_fit(t.shape, desc.shape, rows):
                return (
                    f"{at} {kind[:-1]} '{desc.name}' has shape {shape_text(t.shape)} in the graph but "
                    f"{shape_text(desc.shape)} in the manifest"
                )
    for location in sorted(io.external_files):
        if location not in files:
            return f"{at} keeps weights in '{location}', which is not listed in files"
    return None
