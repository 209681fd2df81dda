"""Pure TensorRT planning: optimization profiles, engine compatibility, step bindings and records.

Everything here is computed from a bundle's typed manifest (no TensorRT, no CUDA), and is the
tested part of the backend (tests/test_tensorrt_plan.py); :mod:`.build` and :mod:`.runner` feed it
to TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import Engine, Plan, Step, TensorDesc

from rstr.errors import BackendUnavailable, BundleError

GRAPHS = ("denoiser", "step_guided", "step_single")
STEP_GRAPH = {"guided": "step_guided", "single": "step_single"}
ALIGN = 256  # TensorRT wants I/O addresses 256-byte aligned; cudaMalloc returns such addresses
REBUILD = "rebuild with `rstr-export build --backend tensorrt`"
ENGINE_DIR = "engines"

# Which rows each step-graph tensor has, in units of the bundle batch B (docs/bundle.md).
_STEP_ROWS = {
    "step_guided": {"sample": 1, "model_output": 2, "next_sample": 1, "next_sample_pair": 2, "history": 1, "next_history": 1},
    "step_single": {"sample": 1, "model_output": 1, "next_sample": 1, "next_sample_pair": 2, "history": 1, "next_history": 1},
}


def _version(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _short(v: str) -> str:
    """'10.3.0.26' -> '10.3.0' (the build number does not change engine compatibility)."""
    return ".".join(str(p) for p in _version(v)[:3]) or str(v)


def tensor_rows(graph: str, tensor: str, rows: int, batch: int) -> int:
    """Rows of ``tensor`` in ``graph``: the denoiser runs at ``rows`` (B or 2B); step graphs follow the contract."""
    if graph == "denoiser":
        return rows
    return _STEP_ROWS.get(graph, {}).get(tensor, 1) * batch


def resolve_shape(graph: str, desc: TensorDesc, rows: int, batch: int) -> tuple[int, ...]:
    """The concrete shape of a manifest tensor description: a symbolic axis 0 (``"batch"``, ``"batch2"``) becomes the tensor's rows."""
    want = tensor_rows(graph, desc.name, rows, batch)
    shape = []
    for i, d in enumerate(desc.shape):
        if isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
            shape.append(int(d))
        elif i == 0:
            shape.append(want)
        else:
            raise BundleError(
                f"graph {graph} tensor {desc.name} has axis {i} named {d!r}; only the batch axis (0) "
                "is symbolic, give every other axis as a number"
            )
    if graph in _STEP_ROWS and desc.name in _STEP_ROWS[graph] and shape and shape[0] != want:
        raise BundleError(f"graph {graph} tensor {desc.name} has {shape[0]} rows; docs/bundle.md says {want} at batch {batch}")
    return tuple(shape)


def graphs_needed(plan: Plan) -> list[str]:
    """The graphs the plan uses: the denoiser and the step graph of each step kind present."""
    out = ["denoiser"] if plan.steps else []
    if any(s.guided for s in plan.steps):
        out.append("step_guided")
    if any(not s.guided for s in plan.steps):
        out.append("step_single")
    return out


Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


def profiles_for(graph_inputs: list[TensorDesc], batch: int, kind: str, rows: Iterable[int] | None = None) -> list[ProfileShapes]:
    """TensorRT optimization profiles for one graph, from its manifest input descriptions.

    ``kind`` is the graph name.  The denoiser gets one fixed profile (min = opt = max) per
    batch in ``rows`` (default ``[B, 2B]``), in that order: the profile index of batch N is
    its position.  A step graph gets one fixed profile at the batches of docs/bundle.md.
    """
    if kind not in GRAPHS:
        raise ValueError(f"kind must be one of {GRAPHS}, not {kind!r}")
    if kind == "denoiser":
        rows = list(rows) if rows is not None else [batch, 2 * batch]
    else:
        rows = [batch]
    profiles = []
    for n in rows:
        profile = {}
        for desc in graph_inputs:
            shape = resolve_shape(kind, desc, n, batch)
            profile[desc.name] = (shape, shape, shape)
        profiles.append(profile)
    return profiles


def profiles_json(profiles: list[ProfileShapes], rows: list[int]) -> list[dict]:
    """The manifest form of ``profiles``: ``[{"batch": N, "inputs": {name: {"min", "opt", "max"}}}]``."""
    return [
        {"batch": n, "inputs": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}}
        for n, p in zip(rows, profiles)
    ]


def _entry_field(entry: Engine, key: str):
    value = getattr(entry, key)
    if value is None:
        raise BundleError(f"engine entry {entry.file!r} lacks {key!r}; {REBUILD}")
    return value


def check_compatible(entry: Engine, trt_version: str, compute_capability: str) -> None:
    """Refuse an engine this TensorRT or this GPU cannot run, with the fix.

    A TensorRT engine runs only on the TensorRT release that built it (major.minor.patch)
    and on GPUs of the compute capability it was built on.  Engines built version-compatible
    also run on later releases of the same major version (and TensorRT 10 ones on TensorRT 11);
    engines built hardware-compatible (``"hardware_compatibility": "ampere_plus"``) run on any
    GPU of compute capability 8.0 or later.
    """
    built_v, built_cc = str(_entry_field(entry, "tensorrt_version")), str(_entry_field(entry, "compute_capability"))
    file = entry.file
    have, built = _version(trt_version)[:3], _version(built_v)[:3]
    if entry.version_compatible:
        majors_ok = have[:1] == built[:1] or (built[:1], have[:1]) in {((10,), (11,)), ((8,), (10,))}
        version_ok = majors_ok and have >= built
    else:
        version_ok = have == built
    hw = entry.hardware_compatibility.lower()
    have_cc, built_cc_t = _version(compute_capability)[:2], _version(built_cc)[:2]
    if hw == "ampere_plus":
        cc_ok = have_cc >= (8, 0)
    elif hw in ("none", ""):
        cc_ok = have_cc == built_cc_t
    else:
        raise BundleError(f"engine {file} has unknown hardware_compatibility {hw!r}; {REBUILD}")
    if not (version_ok and cc_ok):
        raise BackendUnavailable(
            f"engine {file} was built for TensorRT {_short(built_v)} on compute capability {built_cc}; "
            f"this machine has TensorRT {_short(trt_version)} on {compute_capability}: {REBUILD}"
        )


def select_engines(bundle: Bundle, trt_version: str, compute_capability: str) -> dict[str, Engine]:
    """The engine entry of each graph the plan uses, checked present and compatible."""
    needed = graphs_needed(bundle.plan)
    entries = bundle.engines_for("tensorrt")
    if not entries:
        raise BackendUnavailable(
            f"bundle {bundle.root} has no TensorRT engines; build them with `rstr-export build --backend tensorrt`"
        )
    by_graph: dict[str, Engine] = {}
    for entry in entries:
        by_graph.setdefault(entry.graph, entry)
    missing = [g for g in needed if g not in by_graph]
    if missing:
        raise BackendUnavailable(f"bundle {bundle.root} has no TensorRT engine for {', '.join(missing)}; {REBUILD}")
    out = {}
    for graph in needed:
        entry = by_graph[graph]  # listed in files, so checked at open (rstr.engines.validate)
        check_compatible(entry, trt_version, compute_capability)
        out[graph] = entry
    rows = bundle.plan.denoiser_rows
    have = [p["batch"] for p in by_graph["denoiser"].profiles] if needed else []
    lacking = [n for n in rows if n not in have]
    if lacking:
        raise BackendUnavailable(f"the denoiser engine has no profile for batch {lacking[0]} (it has {have}); {REBUILD}")
    return out


def host_code_allowed(entries: Iterable[Engine], trusted: bool) -> bool:
    """Whether the TensorRT runtime may run host code embedded in these engines (``engine_host_code_allowed``).

    Version-compatible engines embed TensorRT's lean runtime, which runs as host code when the
    engine loads: a bundle's files are hashed but unsigned, so that code is as trustworthy as
    its author.  Such engines load only when the caller says it trusts the author
    (``trust_engine_host_code`` / ``--trust-engine-host-code``); other engines never need host code.
    """
    compatible = [e.file for e in entries if e.version_compatible]
    if compatible and not trusted:
        raise BackendUnavailable(
            f"engine {compatible[0]} is version-compatible: it embeds TensorRT's lean runtime as host code that runs when "
            "it loads; pass trust_engine_host_code=True (--trust-engine-host-code) only if you trust the bundle's "
            f"author, or {REBUILD}"
        )
    return bool(compatible)


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one step record: the constants one step feeds its graphs, each 256-byte aligned.
    ``coef_sample`` and ``coef_eps`` hold ``history + 1`` floats each (current step first)."""

    timestep_rows: int
    timestep_dtype: np.dtype
    offsets: dict[str, int]
    size: int
    history: int = 0

    def pack(self, step: Step, rows: int) -> np.ndarray:
        """The record of ``step`` (whose denoiser runs at ``rows``) as bytes."""
        out = np.zeros(self.size, np.uint8)
        ts = np.full(rows, step.model_timestep, self.timestep_dtype)
        out[self.offsets["timestep"] : self.offsets["timestep"] + ts.nbytes] = ts.view(np.uint8)
        coef_sample, coef_eps = step.coefficients(self.history)
        values = {"scale": [step.scale or 0.0], "coef_sample": coef_sample, "coef_eps": coef_eps}
        for name, value in values.items():
            v = np.array(value, np.float32)
            out[self.offsets[name] : self.offsets[name] + v.nbytes] = v.view(np.uint8)
        return out


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def record_layout(bundle: Bundle) -> RecordLayout:
    rows = max(bundle.plan.denoiser_rows, default=bundle.batch)
    ts = {d.name: d for d in bundle.graph_inputs("denoiser")}.get("timestep")
    if ts is None:
        raise BundleError("the denoiser graph has no 'timestep' input (docs/bundle.md)")
    dtype = np.dtype(ts.np_dtype)
    offsets = {"timestep": 0}
    at = _align(rows * dtype.itemsize)
    k = bundle.plan.history
    for name, count in (("scale", 1), ("coef_sample", k + 1), ("coef_eps", k + 1)):
        offsets[name] = at
        at += _align(4 * count)
    return RecordLayout(rows, dtype, offsets, at, k)


def step_records(bundle: Bundle, layout: RecordLayout | None = None) -> np.ndarray:
    """Every step's record, back to back (``num_steps * layout.size`` bytes), uploaded once at activation."""
    layout = layout or record_layout(bundle)
    if not bundle.steps:
        return np.zeros(0, np.uint8)
    return np.concatenate([layout.pack(s, bundle.plan.rows(s.guided)) for s in bundle.steps])


@dataclass(frozen=True)
class PathBinding:
    """What one step kind runs, i.e. what one CUDA graph captures.

    ``feeds[graph][tensor]`` names the buffer bound to each input and output: ``x``,
    ``x_next``, ``x2``, ``model_output``, ``cond/<name>``, ``history`` and ``history_next``
    (multistep plans), or ``record/<field>`` (a field of the step record).  ``copies`` are
    device copies ``(dst, src)`` enqueued after the step graph.
    """

    kind: str
    rows: int
    denoiser_profile: int
    step_graph: str
    shapes: dict[str, dict[str, Shape]]
    feeds: dict[str, dict[str, str]]
    copies: tuple[tuple[str, str], ...] = (("x", "x_next"),)


@dataclass(frozen=True)
class StepBinding:
    index: int
    path: PathBinding
    model_timestep: float
    scale: float | None
    coef_sample: tuple[float, ...]  # [current, previous, ...], zero-padded to the plan's history + 1
    coef_eps: tuple[float, ...]
    record_offset: int = 0


def _profile_index(entry: Engine | None, rows: int, default_rows: list[int]) -> int:
    if entry is None:
        return default_rows.index(rows)
    batches = [p["batch"] for p in entry.profiles]
    if rows not in batches:
        raise BackendUnavailable(f"the denoiser engine has no profile for batch {rows} (it has {batches}); {REBUILD}")
    return batches.index(rows)


def plan_bindings(bundle: Bundle, entries: dict[str, Engine] | None = None) -> list[StepBinding]:
    """Each plan step mapped to its path: engines, denoiser profile, shapes and buffers.

    ``entries`` (graph -> engine entry) gives the denoiser's profile order; by default the
    bundle's TensorRT entries, or the order ``build_engines`` uses when it has none.
    """
    b = bundle.batch
    if entries is None:
        entries = {e.graph: e for e in bundle.engines_for("tensorrt")}
    default_rows = bundle.plan.denoiser_rows
    layout = record_layout(bundle)
    history = bundle.plan.history
    cond_names = [d.name for d in bundle.cond_inputs]
    paths: dict[str, PathBinding] = {}

    def path(kind: str) -> PathBinding:
        if kind in paths:
            return paths[kind]
        rows = bundle.plan.rows(kind == "guided")
        step_graph = STEP_GRAPH[kind]
        shapes: dict[str, dict[str, Shape]] = {}
        for graph in ("denoiser", step_graph):
            descs = bundle.graph_inputs(graph) + bundle.graph_outputs(graph)
            shapes[graph] = {d.name: resolve_shape(graph, d, rows, b) for d in descs}
        den = {"sample": "x2" if kind == "guided" else "x", "timestep": "record/timestep", "model_output": "model_output"}
        den.update({name: f"cond/{name}" for name in cond_names})
        step = {
            "sample": "x",
            "model_output": "model_output",
            "coef_sample": "record/coef_sample",
            "coef_eps": "record/coef_eps",
            "next_sample": "x_next",
            "next_sample_pair": "x2",
        }
        if kind == "guided":
            step["scale"] = "record/scale"
        if history:
            step.update({"history": "history", "next_history": "history_next"})
        for graph, feeds in (("denoiser", den), (step_graph, step)):
            unknown = sorted(set(shapes[graph]) - set(feeds))
            if unknown:
                raise BundleError(f"graph {graph} has tensors {unknown} that docs/bundle.md does not define")
        paths[kind] = PathBinding(
            kind,
            rows,
            _profile_index(entries.get("denoiser"), rows, default_rows),
            step_graph,
            shapes,
            {"denoiser": den, step_graph: step},
            (("x", "x_next"), ("history", "history_next")) if history else (("x", "x_next"),),
        )
        return paths[kind]

    def binding(i: int, s: Step) -> StepBinding:
        coef_sample, coef_eps = s.coefficients(history)
        kind = "guided" if s.guided else "single"
        return StepBinding(i, path(kind), float(s.model_timestep), s.scale, tuple(coef_sample), tuple(coef_eps), i * layout.size)

    return [binding(i, s) for i, s in enumerate(bundle.steps)]


@dataclass(frozen=True)
class BufferSpec:
    shape: Shape
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def buffer_specs(bundle: Bundle) -> dict[str, BufferSpec]:
    """The persistent device buffers: each at the largest batch any path binds it with."""
    b = bundle.batch
    rows = max(bundle.plan.denoiser_rows, default=b)
    sample = bundle.batched_sample
    out_desc = {d.name: d for d in bundle.graph_outputs("denoiser")}.get("model_output")
    if out_desc is None:
        raise BundleError("the denoiser graph has no 'model_output' output (docs/bundle.md)")
    specs = {
        "x": BufferSpec(sample.concrete(b), np.dtype(sample.np_dtype)),
        "x_next": BufferSpec(sample.concrete(b), np.dtype(sample.np_dtype)),
        "x2": BufferSpec(sample.concrete(2 * b), np.dtype(sample.np_dtype)),
        "model_output": BufferSpec(resolve_shape("denoiser", out_desc, rows, b), np.dtype(out_desc.np_dtype)),
    }
    for d in bundle.cond_inputs:
        specs[f"cond/{d.name}"] = BufferSpec(d.concrete(rows), np.dtype(d.np_dtype))
    k = bundle.plan.history
    if k:  # past (sample, model output) pairs of multistep plans; the step graph writes history_next
        past = (b, k, 2, *sample.concrete(b)[1:])
        specs.update({name: BufferSpec(past, np.dtype(np.float32)) for name in ("history", "history_next")})
    return specs
