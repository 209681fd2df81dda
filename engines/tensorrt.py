"""TensorRT backend: build engines from a bundle's ONNX graphs, and walk the plan on them.

.. warning::
   Written against the documented TensorRT 10/11 Python API, polygraphy 0.49+ and cuda-python
   12/13, but **not executed where it was written**: TensorRT cannot be installed on the build
   machines (its wheels come from NVIDIA's index) and the lent GPU machines have no TensorRT.
   The pure logic below (profiles, compatibility, plan bindings, step records) is tested
   everywhere; ``build_engines`` and :class:`TensorRTRunner` are tested only by the tests marked
   ``tensorrt`` and ``gpu``, which skip where either is missing.  Run them on a machine with
   both before trusting this path.

Build (``build_engines``, called by the exporter)
    One engine per graph the plan uses, parsed from the bundle's ONNX with polygraphy's
    ``NetworkFromOnnxPath`` (strongly typed: precision lives in the ONNX, as TensorRT 11
    requires), a timing cache file reused and extended across builds, the builder optimization
    level and an optional workspace limit.  Engines go to ``engines/<graph>.plan``.

    Profiles.  The denoiser gets **one fixed profile per batch the plan uses** (min = opt = max
    = B for unguided steps, 2B for guided steps) rather than one [B, 2B] range with opt = 2B:
    the bundle's batch is fixed at export, each CUDA graph needs a static shape anyway, a fixed
    profile lets TensorRT pick tactics for exactly that shape (a range tuned at 2B runs B with
    2B's tactics), and the weights are stored once per engine whatever the number of profiles.
    The cost is one execution context per profile, whose activation memory is shared (below).
    Step graphs have static shapes and one profile each.

Run (:class:`TensorRTRunner`)
    * Device memory through cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before
      cuda-python 12.6), not torch: ``rstr.engines`` must run without torch.  Every buffer is
      allocated once at activation; nothing is allocated per call.
    * One execution context per (graph, profile) in use: the denoiser at 2B and at B, and the
      two step graphs.  The contexts run one after another on one stream, never concurrently,
      so they share one activation (scratch) buffer sized for the largest
      (``ExecutionContextAllocationStrategy.USER_MANAGED``; TensorRT 10.1+, else each context
      keeps its own).
    * Buffers: ``x [B]``, ``x_next [B]``, ``x2 [2B]`` (always ``[x; x]``), ``model_output``
      and each conditioning input at the largest batch the plan uses (rows ``[cond; uncond]``;
      the unguided path binds the same addresses at batch B, i.e. the first B rows, which are
      ``cond``), and one *step record* holding the current step's constants.
    * The walk of docs/bundle.md, device-resident: the denoiser reads ``x2`` (guided) or ``x``
      (unguided) and writes ``model_output``; the step graph reads ``x`` and writes ``x_next``
      and ``x2`` (``next_sample_pair``, written straight into the denoiser's next input: the
      denoiser has already read it); a device copy ``x_next -> x`` closes the step (a graph may
      not read and write one buffer).
    * CUDA graphs: one per step kind (guided at 2B, unguided at B), capturing denoiser + step
      graph + that copy.  A graph bakes addresses and shapes, so per-step constants cannot be
      arguments.  Scheme: at activation every step's constants (timestep rows, scale,
      coef_sample, coef_eps) are laid out as fixed-size records in one device table; before
      each replay one device-to-device copy moves step i's record into the fixed record buffer
      the graphs read.  Per step that is one small D2D copy and one graph launch on one stream:
      no host copy, no host synchronisation.  Without graphs (``cuda_graphs=False``, or when
      capture fails) the same sequence is enqueued directly.
    * ``infer`` copies noise and conditioning in once, walks the plan, and copies the final
      latents out once (plus one copy per step when ``trace`` is asked for).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from rstr.engines.base import Runner
from rstr.engines.bundle import Bundle, TensorDesc, safe_member
from rstr.errors import BackendUnavailable, BundleError, RstrError

GRAPHS = ("denoiser", "step_guided", "step_single")
STEP_GRAPH = {"guided": "step_guided", "single": "step_single"}
ALIGN = 256  # TensorRT wants I/O addresses 256-byte aligned; cudaMalloc returns such addresses
REBUILD = "rebuild with `rstr-export build --backend tensorrt`"
ENGINE_DIR = "engines"

# Which rows each step-graph tensor has, in units of the bundle batch B (docs/bundle.md).
_STEP_ROWS = {
    "step_guided": {"sample": 1, "model_output": 2, "next_sample": 1, "next_sample_pair": 2},
    "step_single": {"sample": 1, "model_output": 1, "next_sample": 1, "next_sample_pair": 2},
}


# ============================================================================ pure logic
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
    """The concrete shape of a manifest tensor description: ``"batch"`` axes become the tensor's rows."""
    want = tensor_rows(graph, desc.name, rows, batch)
    shape = []
    for i, d in enumerate(desc.shape):
        if d == "batch":
            shape.append(want)
        elif isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
            shape.append(int(d))
        else:
            raise BundleError(f"graph {graph} tensor {desc.name} has axis {i} named {d!r}; bundles name the batch axis "
                              "'batch' and give every other axis as a number")
    if graph in _STEP_ROWS and desc.name in _STEP_ROWS[graph] and shape and shape[0] != want:
        raise BundleError(f"graph {graph} tensor {desc.name} has {shape[0]} rows; docs/bundle.md says {want} at batch {batch}")
    return tuple(shape)


def rows_needed(steps: Iterable[dict], batch: int) -> list[int]:
    """The denoiser batches the plan runs: B for unguided steps, 2B for guided ones (ascending)."""
    return sorted({2 * batch if s["guided"] else batch for s in steps})


def graphs_needed(steps: Iterable[dict]) -> list[str]:
    """The graphs the plan uses: the denoiser and the step graph of each step kind present."""
    steps = list(steps)
    out = ["denoiser"] if steps else []
    if any(s["guided"] for s in steps):
        out.append("step_guided")
    if any(not s["guided"] for s in steps):
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
    return [{"batch": n, "inputs": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}}
            for n, p in zip(rows, profiles)]


def _entry_field(entry: dict, key: str):
    if key not in entry:
        raise BundleError(f"engine entry {entry.get('file', entry.get('graph', '?'))!r} lacks {key!r}; {REBUILD}")
    return entry[key]


def check_compatible(entry: dict, trt_version: str, compute_capability: str) -> None:
    """Refuse an engine this TensorRT or this GPU cannot run, with the fix.

    A TensorRT engine runs only on the TensorRT release that built it (major.minor.patch)
    and on GPUs of the compute capability it was built on.  Engines built version-compatible
    also run on later releases of the same major version (and TensorRT 10 ones on TensorRT 11);
    engines built hardware-compatible (``"hardware_compatibility": "ampere_plus"``) run on any
    GPU of compute capability 8.0 or later.
    """
    built_v, built_cc = str(_entry_field(entry, "tensorrt_version")), str(_entry_field(entry, "compute_capability"))
    file = entry.get("file", f"{ENGINE_DIR}/{entry.get('graph', '?')}.plan")
    have, built = _version(trt_version)[:3], _version(built_v)[:3]
    if entry.get("version_compatible"):
        majors_ok = have[:1] == built[:1] or (built[:1], have[:1]) in {((10,), (11,)), ((8,), (10,))}
        version_ok = majors_ok and have >= built
    else:
        version_ok = have == built
    hw = str(entry.get("hardware_compatibility") or "none").lower()
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
            f"this machine has TensorRT {_short(trt_version)} on {compute_capability}: {REBUILD}")


def select_engines(bundle: Bundle, trt_version: str, compute_capability: str) -> dict[str, dict]:
    """The engine entry of each graph the plan uses, checked present, listed in ``files`` and compatible."""
    needed = graphs_needed(bundle.steps)
    entries = bundle.engines_for("tensorrt")
    if not entries:
        raise BackendUnavailable(f"bundle {bundle.root} has no TensorRT engines; build them with `rstr-export build --backend tensorrt`")
    by_graph: dict[str, dict] = {}
    for entry in entries:
        by_graph.setdefault(_entry_field(entry, "graph"), entry)
    missing = [g for g in needed if g not in by_graph]
    if missing:
        raise BackendUnavailable(f"bundle {bundle.root} has no TensorRT engine for {', '.join(missing)}; {REBUILD}")
    out = {}
    for graph in needed:
        entry = by_graph[graph]
        file = _entry_field(entry, "file")
        if file not in bundle.manifest["files"]:
            raise BundleError(f"engine file {file} is not listed in the manifest's 'files' (so it is not checksummed); {REBUILD}")
        check_compatible(entry, trt_version, compute_capability)
        out[graph] = entry
    rows = rows_needed(bundle.steps, bundle.batch)
    have = [p.get("batch") for p in by_graph["denoiser"].get("profiles", [])] if needed else []
    lacking = [n for n in rows if n not in have]
    if lacking:
        raise BackendUnavailable(f"the denoiser engine has no profile for batch {lacking[0]} (it has {have}); {REBUILD}")
    return out


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one step record: the constants one step feeds its graphs, each 256-byte aligned."""

    timestep_rows: int
    timestep_dtype: np.dtype
    offsets: dict[str, int]
    size: int

    def pack(self, step: dict, rows: int) -> np.ndarray:
        """The record of ``step`` (whose denoiser runs at ``rows``) as bytes."""
        out = np.zeros(self.size, np.uint8)
        ts = np.full(rows, step["model_timestep"], self.timestep_dtype)
        out[self.offsets["timestep"]:self.offsets["timestep"] + ts.nbytes] = ts.view(np.uint8)
        for name in ("scale", "coef_sample", "coef_eps"):
            value = step.get(name)
            v = np.array([0.0 if value is None else value], np.float32)
            out[self.offsets[name]:self.offsets[name] + 4] = v.view(np.uint8)
        return out


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def record_layout(bundle: Bundle) -> RecordLayout:
    batch = bundle.batch
    rows = max(rows_needed(bundle.steps, batch), default=batch)
    ts = {d.name: d for d in bundle.graph_inputs("denoiser")}.get("timestep")
    if ts is None:
        raise BundleError("the denoiser graph has no 'timestep' input (docs/bundle.md)")
    dtype = np.dtype(ts.np_dtype)
    offsets = {"timestep": 0}
    at = _align(rows * dtype.itemsize)
    for name in ("scale", "coef_sample", "coef_eps"):
        offsets[name] = at
        at += ALIGN
    return RecordLayout(rows, dtype, offsets, at)


def step_records(bundle: Bundle, layout: RecordLayout | None = None) -> np.ndarray:
    """Every step's record, back to back (``num_steps * layout.size`` bytes), uploaded once at activation."""
    layout = layout or record_layout(bundle)
    b = bundle.batch
    if not bundle.steps:
        return np.zeros(0, np.uint8)
    return np.concatenate([layout.pack(s, 2 * b if s["guided"] else b) for s in bundle.steps])


@dataclass(frozen=True)
class PathBinding:
    """What one step kind runs, i.e. what one CUDA graph captures.

    ``feeds[graph][tensor]`` names the buffer bound to each input and output: ``x``,
    ``x_next``, ``x2``, ``model_output``, ``cond/<name>``, or ``record/<field>`` (a field of the
    step record).  ``copies`` are device copies ``(dst, src)`` enqueued after the step graph.
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
    coef_sample: float
    coef_eps: float
    record_offset: int = 0


def _profile_index(entry: dict | None, rows: int, default_rows: list[int]) -> int:
    if entry is None:
        return default_rows.index(rows)
    batches = [p.get("batch") for p in entry.get("profiles", [])]
    if rows not in batches:
        raise BackendUnavailable(f"the denoiser engine has no profile for batch {rows} (it has {batches}); {REBUILD}")
    return batches.index(rows)


def plan_bindings(bundle: Bundle, entries: dict[str, dict] | None = None) -> list[StepBinding]:
    """Each plan step mapped to its path: engines, denoiser profile, shapes and buffers.

    ``entries`` (graph -> engine entry) gives the denoiser's profile order; by default the
    bundle's TensorRT entries, or the order ``build_engines`` uses when it has none.
    """
    b = bundle.batch
    if entries is None:
        entries = {e.get("graph"): e for e in bundle.engines_for("tensorrt")}
    default_rows = rows_needed(bundle.steps, b)
    layout = record_layout(bundle)
    cond_names = [d.name for d in bundle.cond_inputs]
    paths: dict[str, PathBinding] = {}

    def path(kind: str) -> PathBinding:
        if kind in paths:
            return paths[kind]
        rows = 2 * b if kind == "guided" else b
        step_graph = STEP_GRAPH[kind]
        shapes: dict[str, dict[str, Shape]] = {}
        for graph in ("denoiser", step_graph):
            descs = bundle.graph_inputs(graph) + bundle.graph_outputs(graph)
            shapes[graph] = {d.name: resolve_shape(graph, d, rows, b) for d in descs}
        den = {"sample": "x2" if kind == "guided" else "x", "timestep": "record/timestep", "model_output": "model_output"}
        den.update({name: f"cond/{name}" for name in cond_names})
        step = {"sample": "x", "model_output": "model_output", "coef_sample": "record/coef_sample",
                "coef_eps": "record/coef_eps", "next_sample": "x_next", "next_sample_pair": "x2"}
        if kind == "guided":
            step["scale"] = "record/scale"
        for graph, feeds in (("denoiser", den), (step_graph, step)):
            unknown = sorted(set(shapes[graph]) - set(feeds))
            if unknown:
                raise BundleError(f"graph {graph} has tensors {unknown} that docs/bundle.md does not define")
        paths[kind] = PathBinding(kind, rows, _profile_index(entries.get("denoiser"), rows, default_rows), step_graph,
                                  shapes, {"denoiser": den, step_graph: step})
        return paths[kind]

    return [StepBinding(i, path("guided" if s["guided"] else "single"), float(s["model_timestep"]), s.get("scale"),
                        float(s["coef_sample"]), float(s["coef_eps"]), i * layout.size)
            for i, s in enumerate(bundle.steps)]


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
    rows = max(rows_needed(bundle.steps, b), default=b)
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
    return specs


# ============================================================================ lazy imports
_LOGGER = None


def _trt():
    """The tensorrt module, or BackendUnavailable."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (pip install 'rstr[tensorrt]' from NVIDIA's package index)") from None
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and others at import
        raise BackendUnavailable(f"TensorRT is installed but cannot be imported ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return tensorrt


def _trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        raise BackendUnavailable("cuda-python is not installed; pip install 'rstr[tensorrt]'") from None


class CudaError(RuntimeError):
    """A CUDA runtime call failed (an internal fault or a broken GPU, not a user error)."""


class _Cuda:
    """The few CUDA runtime calls this backend makes, through cuda-python, each checked."""

    def __init__(self):
        self.rt = _cudart()

    def _name(self, err) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1]
            text = self.rt.cudaGetErrorString(err)[1]
            return f"{name.decode() if isinstance(name, bytes) else name}: {text.decode() if isinstance(text, bytes) else text}"
        except Exception:  # error lookup must not mask the error
            return str(err)

    def check(self, result, what: str):
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{what} failed ({self._name(err)})")
        return values[0] if len(values) == 1 else (values or None)

    def device_count(self) -> tuple[int, str | None]:
        err, *rest = self.rt.cudaGetDeviceCount()
        if err != self.rt.cudaError_t.cudaSuccess:
            return 0, self._name(err)
        return int(rest[0]), None

    def device_info(self, device: int) -> tuple[str, str]:
        prop = self.check(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name
        name = (name.decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)).split("\x00")[0].strip()
        return name, f"{prop.major}.{prop.minor}"

    def set_device(self, device: int) -> None:
        self.check(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def stream(self):
        return self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def stream_destroy(self, stream) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def memset(self, ptr: int, nbytes: int, stream) -> None:
        self.check(self.rt.cudaMemsetAsync(ptr, 0, nbytes, stream), "cudaMemsetAsync")

    def h2d(self, ptr: int, array: np.ndarray, stream) -> None:
        array = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync host-to-device")

    def d2h(self, array: np.ndarray, ptr: int, stream) -> None:
        assert array.flags.c_contiguous
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream), "cudaMemcpyAsync device-to-host")

    def d2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync device-to-device")

    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream):
        return self.check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")

    def instantiate(self, graph):
        return self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def launch(self, graph_exec, stream) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def graph_destroy(self, graph) -> None:
        self.check(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def exec_destroy(self, graph_exec) -> None:
        self.check(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")


def _gpu(device: int) -> tuple[_Cuda, str, str]:
    """cuda-python, this device's name and compute capability, or BackendUnavailable."""
    cuda = _Cuda()
    count, why = cuda.device_count()
    if count == 0:
        raise BackendUnavailable(f"no CUDA GPU is usable on this machine ({why or 'no device found'})")
    if not 0 <= device < count:
        raise BackendUnavailable(f"GPU {device} does not exist; this machine has {count} (0..{count - 1})")
    name, cc = cuda.device_info(device)
    return cuda, name, cc


# ============================================================================ build
def _strongly_typed_kwargs(trt) -> dict:
    # TensorRT 10 needs the flag for precision to follow the ONNX; TensorRT 11 networks are
    # always strongly typed and accept (or no longer define) the flag.
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return {"strongly_typed": True} if flags is not None and hasattr(flags, "STRONGLY_TYPED") else {}


def build_engines(bundle_root: Path, manifest: dict, *, timing_cache: Path | None = None, optimization_level: int = 3,
                  workspace_bytes: int | None = None, version_compatible: bool = False, hardware_compatible: bool = False,
                  device: int = 0) -> list[dict]:
    """Build a TensorRT engine for each graph the plan uses; return their manifest entries.

    Engines are written to ``<bundle_root>/engines/<graph>.plan``; the caller adds each
    entry's ``file`` with its sha256 to the manifest's ``files`` and the entries to
    ``engines``.  ``timing_cache`` is read if present and extended after each build, so
    rebuilding (another schedule, the same model) skips tactic timing.  ``optimization_level``
    is TensorRT's builder optimization level (0..5, default 3); ``workspace_bytes`` caps the
    builder's workspace pool.  ``version_compatible`` builds engines later TensorRT releases
    can run (slower; they embed the lean runtime); ``hardware_compatible`` builds for any GPU
    of compute capability 8.0 or later (slower).

    Not executed where it was written (no TensorRT there): see the module docstring.
    """
    if not 0 <= int(optimization_level) <= 5:
        raise RstrError(f"TensorRT optimization level {optimization_level} is out of range; use 0..5 (3 is TensorRT's default)")
    if workspace_bytes is not None and int(workspace_bytes) <= 0:
        raise RstrError(f"workspace_bytes {workspace_bytes} must be positive (or None for TensorRT's default)")
    trt = _trt()
    cuda, device_name, cc = _gpu(device)
    cuda.set_device(device)
    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
        from polygraphy.exception import PolygraphyException
    except ImportError:
        raise BackendUnavailable("polygraphy is not installed; pip install 'polygraphy>=0.49'") from None

    root = Path(bundle_root)
    batch = int(manifest["batch"])
    steps = manifest["plan"]["steps"]
    cache = str(timing_cache) if timing_cache is not None else None
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    config_kwargs: dict[str, Any] = {"builder_optimization_level": int(optimization_level), "load_timing_cache": cache}
    if workspace_bytes is not None:
        config_kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)}
    if version_compatible:
        config_kwargs["version_compatible"] = True
    if hardware_compatible:
        config_kwargs["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    (root / ENGINE_DIR).mkdir(exist_ok=True)

    entries = []
    for graph in graphs_needed(steps):
        spec = manifest["graphs"][graph]
        inputs = [TensorDesc.from_json(d) for d in spec["inputs"]]
        rows = rows_needed(steps, batch) if graph == "denoiser" else [batch]
        profiles = profiles_for(inputs, batch, graph, rows=rows)
        trt_profiles = []
        for p in profiles:
            prof = Profile()
            for name, (lo, opt, hi) in p.items():
                prof.add(name, min=lo, opt=opt, max=hi)
            trt_profiles.append(prof)
        onnx_path = safe_member(root, spec["file"])
        network = NetworkFromOnnxPath(str(onnx_path), **_strongly_typed_kwargs(trt))
        config = CreateConfig(profiles=trt_profiles, **config_kwargs)
        try:
            plan = EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)()
        except PolygraphyException as err:
            first = (str(err).strip().splitlines() or ["see the TensorRT log above"])[0]
            raise BackendUnavailable(f"TensorRT could not build the {graph} engine from {spec['file']}: {first}") from None
        rel = f"{ENGINE_DIR}/{graph}.plan"
        dest = safe_member(root, rel)
        tmp = dest.with_suffix(".plan.tmp")
        with open(tmp, "wb") as fh:
            fh.write(memoryview(plan))  # IHostMemory supports the buffer protocol: no extra copy
        os.replace(tmp, dest)
        entries.append({
            "backend": "tensorrt",
            "graph": graph,
            "file": rel,
            "tensorrt_version": trt.__version__,
            "compute_capability": cc,
            "device_name": device_name,
            "version_compatible": bool(version_compatible),
            "hardware_compatibility": "ampere_plus" if hardware_compatible else "none",
            "builder_optimization_level": int(optimization_level),
            "profiles": profiles_json(profiles, rows),
        })
    return entries


# ============================================================================ runtime
@dataclass
class _Path:
    """A step kind ready to run: its two contexts and, when captured, its CUDA graph."""

    binding: PathBinding
    denoiser: Any
    step: Any
    graph_exec: Any = None


@dataclass
class _State:
    runtime: Any = None
    engines: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, _Path] = field(default_factory=dict)
    buffers: dict[str, int] = field(default_factory=dict)
    scratch: int | None = None
    scratch_bytes: int = 0
    table: int | None = None
    record: int | None = None
    stream: Any = None


class TensorRTRunner(Runner):
    """Walks the plan on TensorRT engines, device-resident, with one CUDA graph per step kind.

    ``__init__`` raises :class:`~rstr.errors.BackendUnavailable` (one line) when TensorRT or
    cuda-python is missing, no GPU is visible, the bundle has no engines for its plan, or an
    engine was built for another TensorRT or GPU.  See the module docstring for the design.
    Not executed where it was written (no TensorRT there).
    """

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, *, cuda_graphs: bool = True, device: int = 0):
        super().__init__(bundle)
        self.trt = _trt()
        self.cuda, self.device_name, self.compute_capability = _gpu(device)
        self.device = device
        self.entries = select_engines(bundle, self.trt.__version__, self.compute_capability)
        self.bindings = plan_bindings(bundle, self.entries)
        self.layout = record_layout(bundle)
        self.specs = buffer_specs(bundle)
        self.cuda_graphs_requested = bool(cuda_graphs)
        self.cuda_graphs = False
        self.shared_scratch = False
        self._s = _State()

    # ------------------------------------------------------------------ activation
    def _activate(self) -> None:
        try:
            self._setup()
        except BaseException:
            try:
                self._teardown()
            except CudaError:
                pass  # the setup error says more than a failure to clean up after it
            raise

    def _setup(self) -> None:
        trt, cuda, s = self.trt, self.cuda, self._s
        cuda.set_device(self.device)
        s.stream = cuda.stream()
        self._stream_handle = int(s.stream)
        s.runtime = trt.Runtime(_trt_logger(trt))
        for graph, entry in self.entries.items():
            data = safe_member(self.bundle.root, entry["file"]).read_bytes()
            if entry.get("version_compatible"):
                s.runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
            engine = s.runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BackendUnavailable(f"TensorRT could not load engine {entry['file']} (see the TensorRT log); {REBUILD}")
            self._check_engine(graph, engine)
            s.engines[graph] = engine

        # Buffers, zeroed (warm-up runs read them before any input arrives).
        for name, spec in self.specs.items():
            s.buffers[name] = cuda.malloc(spec.nbytes)
            cuda.memset(s.buffers[name], spec.nbytes, s.stream)
        s.record = cuda.malloc(self.layout.size)
        cuda.memset(s.record, self.layout.size, s.stream)
        table = step_records(self.bundle, self.layout)
        s.table = cuda.malloc(table.nbytes)
        cuda.h2d(s.table, table, s.stream)

        # Contexts: (graph, profile) per path, sharing one scratch buffer where TensorRT allows.
        kinds = {}
        for sb in self.bindings:
            kinds.setdefault(sb.path.kind, sb.path)
        wanted = [("denoiser", p.denoiser_profile) for p in kinds.values()] + [(p.step_graph, 0) for p in kinds.values()]
        scratch = self._scratch_sizes(wanted)
        if scratch is not None:
            s.scratch_bytes = max(scratch.values(), default=0)
            s.scratch = cuda.malloc(s.scratch_bytes)
            self.shared_scratch = True
        for kind, binding in kinds.items():
            den = self._context("denoiser", binding.denoiser_profile, binding, scratch is not None)
            step = self._context(binding.step_graph, 0, binding, scratch is not None)
            s.paths[kind] = _Path(binding, den, step)
        cuda.sync(s.stream)

        # TensorRT defers some work to the first enqueue after shapes are set: run each path once
        # before capturing (the record and buffers are zeros, so this computes nothing useful).
        for path in s.paths.values():
            self._enqueue(path)
        cuda.sync(s.stream)
        if self.cuda_graphs_requested:
            self.cuda_graphs = self._capture_all()

    def _check_engine(self, graph: str, engine) -> None:
        trt = self.trt
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        manifest = {d.name: d for d in self.bundle.graph_inputs(graph) + self.bundle.graph_outputs(graph)}
        if names != set(manifest):
            raise BundleError(f"engine {self.entries[graph]['file']} has tensors {sorted(names)} but the manifest's {graph} "
                              f"graph has {sorted(manifest)}; {REBUILD}")
        for name in names:
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            want = np.dtype(manifest[name].np_dtype)
            if got != want:
                raise BundleError(f"engine {self.entries[graph]['file']} tensor {name} is {got}, the manifest says {want}; {REBUILD}")
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input != any(d.name == name for d in self.bundle.graph_inputs(graph)):
                raise BundleError(f"engine {self.entries[graph]['file']} tensor {name} is an {'input' if is_input else 'output'} "
                                  f"there but not in the manifest; {REBUILD}")

    def _scratch_sizes(self, wanted: list[tuple[str, int]]) -> dict[tuple[str, int], int] | None:
        """Activation memory per (graph, profile), or None where TensorRT cannot take user-managed memory (< 10.1)."""
        trt = self.trt
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is None or not hasattr(strategy, "USER_MANAGED"):
            return None
        sizes = {}
        for graph, profile in wanted:
            engine = self._s.engines[graph]
            if hasattr(engine, "get_device_memory_size_for_profile_v2"):
                sizes[(graph, profile)] = int(engine.get_device_memory_size_for_profile_v2(profile))
            elif hasattr(engine, "device_memory_size_v2"):
                sizes[(graph, profile)] = int(engine.device_memory_size_v2)
            else:
                return None
        return sizes

    def _context(self, graph: str, profile: int, binding: PathBinding, user_memory: bool):
        trt, s = self.trt, self._s
        engine = s.engines[graph]
        if user_memory:
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise RstrError(f"TensorRT could not create an execution context for {graph} (out of GPU memory?)")
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(s.scratch, s.scratch_bytes)  # TensorRT 10.1+: (address, size)
            else:
                ctx.device_memory = s.scratch
        else:
            ctx = engine.create_execution_context()
            if ctx is None:
                raise RstrError(f"TensorRT could not create an execution context for {graph} (out of GPU memory?)")
        if engine.num_optimization_profiles > 1 or profile != 0:
            ctx.set_optimization_profile_async(profile, self._stream_handle)
        shapes, feeds = binding.shapes[graph], binding.feeds[graph]
        for name in (d.name for d in self.bundle.graph_inputs(graph)):
            if not ctx.set_input_shape(name, shapes[name]):
                raise BundleError(f"engine {self.entries[graph]['file']} refuses input {name} of shape {shapes[name]} "
                                  f"(profile {profile}); {REBUILD}")
        for name, buffer in feeds.items():
            if not ctx.set_tensor_address(name, self._address(buffer)):
                raise CudaError(f"TensorRT refused the address of {name} for {graph}")
        missing = ctx.infer_shapes()
        if missing:
            raise BundleError(f"engine {self.entries[graph]['file']} cannot infer shapes for {list(missing)}; {REBUILD}")
        for name in (d.name for d in self.bundle.graph_outputs(graph)):
            got = tuple(ctx.get_tensor_shape(name))
            if got != shapes[name]:
                raise BundleError(f"engine {self.entries[graph]['file']} gives {name} shape {got}, expected {shapes[name]}; {REBUILD}")
        return ctx

    def _address(self, buffer: str) -> int:
        if buffer.startswith("record/"):
            return self._s.record + self.layout.offsets[buffer.removeprefix("record/")]
        return self._s.buffers[buffer]

    def _enqueue(self, path: _Path) -> None:
        """One step of ``path`` on the stream: denoiser, step graph, then ``x_next -> x``."""
        for ctx, graph in ((path.denoiser, "denoiser"), (path.step, path.binding.step_graph)):
            if not ctx.execute_async_v3(self._stream_handle):
                raise CudaError(f"TensorRT execute_async_v3 failed for {graph} (see the TensorRT log)")
        for dst, src in path.binding.copies:
            self.cuda.d2d(self._s.buffers[dst], self._s.buffers[src], self.specs[dst].nbytes, self._s.stream)

    def _capture_all(self) -> bool:
        """Capture one CUDA graph per path; on any failure use none (warn) and enqueue directly."""
        cuda, s = self.cuda, self._s
        for kind, path in s.paths.items():
            graph = None
            try:
                cuda.begin_capture(s.stream)
                try:
                    self._enqueue(path)
                finally:
                    graph = cuda.end_capture(s.stream)  # always leave capture mode
                path.graph_exec = cuda.instantiate(graph)
            except RuntimeError as err:  # CudaError, or TensorRT refusing to enqueue under capture
                warnings.warn(f"CUDA graph capture failed for {kind} steps ({str(err).splitlines()[0]}); "
                              "running TensorRT without CUDA graphs", stacklevel=4)
                self._drop_graphs()
                cuda.sync(s.stream)
                return False
            finally:
                if graph is not None:
                    cuda.graph_destroy(graph)
        return True

    def _drop_graphs(self) -> None:
        for path in self._s.paths.values():
            if path.graph_exec is not None:
                self.cuda.exec_destroy(path.graph_exec)
                path.graph_exec = None

    def _deactivate(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Free everything, best effort: one failing call does not leak the rest; the first error is raised."""
        s, cuda = self._s, self.cuda
        errors: list[CudaError] = []

        def attempt(fn, *args):
            try:
                fn(*args)
            except CudaError as err:
                errors.append(err)

        if s.stream is not None:
            attempt(cuda.sync, s.stream)
        for path in s.paths.values():
            if path.graph_exec is not None:
                attempt(cuda.exec_destroy, path.graph_exec)
                path.graph_exec = None
        # Contexts before engines before the runtime; device memory only after all of them.
        s.paths.clear()
        s.engines.clear()
        s.runtime = None
        for ptr in [*s.buffers.values(), s.scratch, s.table, s.record]:
            if ptr is not None:
                attempt(cuda.free, ptr)
        if s.stream is not None:
            attempt(cuda.stream_destroy, s.stream)
        self._s = _State()
        self.cuda_graphs = False
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ inference
    def _infer(self, noise, cond, uncond, trace):
        cuda, s = self.cuda, self._s
        stream = s.stream
        b = self.bundle.batch
        guided_any = any(sb.path.kind == "guided" for sb in self.bindings)
        x0 = np.ascontiguousarray(noise * np.float32(self.bundle.plan["init_noise_sigma"]), dtype=self.specs["x"].dtype)
        hosts = {"x": x0, "x2": np.concatenate([x0, x0])}
        for name, value in cond.items():
            hosts[f"cond/{name}"] = np.concatenate([value, uncond[name]]) if guided_any else value
        for name, array in hosts.items():
            array = np.ascontiguousarray(array, dtype=self.specs[name].dtype)
            if array.nbytes != self.specs[name].nbytes:
                raise RuntimeError(f"buffer {name}: {array.shape} does not fill {self.specs[name].shape}")
            hosts[name] = array
            cuda.h2d(s.buffers[name], array, stream)

        for sb in self.bindings:
            path = s.paths[sb.path.kind]
            # The step's constants into the fixed record the graphs read (device to device).
            cuda.d2d(s.record, s.table + sb.record_offset, self.layout.size, stream)
            if path.graph_exec is not None:
                cuda.launch(path.graph_exec, stream)
            else:
                self._enqueue(path)
            if trace is not None:
                x = np.empty(self.specs["x"].shape, self.specs["x"].dtype)
                cuda.d2h(x, s.buffers["x"], stream)
                cuda.sync(stream)
                trace.append(x)
        out = np.empty(self.specs["x"].shape, self.specs["x"].dtype)
        cuda.d2h(out, s.buffers["x"], stream)
        cuda.sync(stream)
        return out

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "tensorrt_version": self.trt.__version__,
            "device": self.device_name,
            "compute_capability": self.compute_capability,
            "cuda_graphs": self.cuda_graphs if self.is_active else self.cuda_graphs_requested,
            "shared_activation_memory_bytes": self._s.scratch_bytes if self.shared_scratch else None,
            "engines": {g: e["file"] for g, e in self.entries.items()},
            "step_kinds": sorted({sb.path.kind for sb in self.bindings}),
        }
