"""The TensorRT runner: walks a bundle's plan on its engines, device-resident, with one CUDA graph per step kind.

.. warning::
   Written against the documented TensorRT 10/11 Python API and cuda-python 12/13, **not
   executed where it was written** (no TensorRT there); tested only by the tests marked
   ``tensorrt`` and ``gpu``.  What it runs is planned by :mod:`.plan`, which is tested everywhere.

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
  not read and write one buffer).  Multistep plans also bind ``history -> history_next``
  (past samples and model outputs, zeroed at the start of each call) and copy it back the same way.
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

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rstr.engines.base import Runner
from rstr.engines.bundle import Bundle
from rstr.engines.tensorrt.cuda import CudaError, gpu, load_tensorrt, trt_logger
from rstr.engines.tensorrt.plan import (
    REBUILD,
    PathBinding,
    buffer_specs,
    host_code_allowed,
    plan_bindings,
    record_layout,
    select_engines,
    step_records,
)

from rstr.errors import BackendUnavailable, BundleError, RstrError


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
    cuda-python is missing, no GPU is visible, the bundle has no engines for its plan, an
    engine was built for another TensorRT or GPU, or an engine is version-compatible (it
    embeds host code that runs on load) and ``trust_engine_host_code`` is False: pass True
    only for bundles whose author you trust as you would trust a program from them.  The module docstring describes the design.
    Not executed where it was written (no TensorRT there).
    """

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, *, cuda_graphs: bool = True, device: int = 0, trust_engine_host_code: bool = False):
        super().__init__(bundle)
        self.trt = load_tensorrt()
        self.cuda, self.device_name, self.compute_capability = gpu(device)
        self.device = device
        self.entries = select_engines(bundle, self.trt.__version__, self.compute_capability)
        self.host_code = host_code_allowed(self.entries.values(), trust_engine_host_code)
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
        s.runtime = trt.Runtime(trt_logger(trt))
        s.runtime.engine_host_code_allowed = self.host_code  # False unless trusted: see host_code_allowed
        for graph, entry in self.entries.items():
            data = self.bundle.member(entry.file).read_bytes()
            engine = s.runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BackendUnavailable(f"TensorRT could not load engine {entry.file} (see the TensorRT log); {REBUILD}")
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
        kinds: dict[str, PathBinding] = {}
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
            raise BundleError(
                f"engine {self.entries[graph].file} has tensors {sorted(names)} but the manifest's {graph} "
                f"graph has {sorted(manifest)}; {REBUILD}"
            )
        for name in names:
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            want = np.dtype(manifest[name].np_dtype)
            if got != want:
                raise BundleError(
                    f"engine {self.entries[graph].file} tensor {name} is {got}, the manifest says {want}; {REBUILD}"
                )
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input != any(d.name == name for d in self.bundle.graph_inputs(graph)):
                raise BundleError(
                    f"engine {self.entries[graph].file} tensor {name} is an {'input' if is_input else 'output'} "
                    f"there but not in the manifest; {REBUILD}"
                )

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
                raise BundleError(
                    f"engine {self.entries[graph].file} refuses input {name} of shape {shapes[name]} "
                    f"(profile {profile}); {REBUILD}"
                )
        for name, buffer in feeds.items():
            if not ctx.set_tensor_address(name, self._address(buffer)):
                raise CudaError(f"TensorRT refused the address of {name} for {graph}")
        missing = ctx.infer_shapes()
        if missing:
            raise BundleError(f"engine {self.entries[graph].file} cannot infer shapes for {list(missing)}; {REBUILD}")
        for name in (d.name for d in self.bundle.graph_outputs(graph)):
            got = tuple(ctx.get_tensor_shape(name))
            if got != shapes[name]:
                raise BundleError(
                    f"engine {self.entries[graph].file} gives {name} shape {got}, expected {shapes[name]}; {REBUILD}"
                )
        return ctx

    def _address(self, buffer: str) -> int:
        if buffer.startswith("record/"):
            assert self._s.record is not None  # allocated at activation
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
                warnings.warn(
                    f"CUDA graph capture failed for {kind} steps ({str(err).splitlines()[0]}); "
                    "running TensorRT without CUDA graphs",
                    stacklevel=4,
                )
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
        assert s.record is not None and s.table is not None  # allocated at activation
        guided_any = any(sb.path.kind == "guided" for sb in self.bindings)
        x0 = np.ascontiguousarray(noise * np.float32(self.bundle.plan.init_noise_sigma), dtype=self.specs["x"].dtype)
        hosts = {"x": x0, "x2": np.concatenate([x0, x0])}
        for name, value in cond.items():
            hosts[f"cond/{name}"] = np.concatenate([value, uncond[name]]) if guided_any else value
        for name, array in hosts.items():
            array = np.ascontiguousarray(array, dtype=self.specs[name].dtype)
            if array.nbytes != self.specs[name].nbytes:
                raise RuntimeError(f"buffer {name}: {array.shape} does not fill {self.specs[name].shape}")
            hosts[name] = array
            cuda.h2d(s.buffers[name], array, stream)

        if "history" in s.buffers:  # no past yet: the first steps' past coefficients are 0, and 0 * stale NaN is not
            cuda.memset(s.buffers["history"], self.specs["history"].nbytes, stream)
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
            "engines": {g: e.file for g, e in self.entries.items()},
            "step_kinds": sorted({sb.path.kind for sb in self.bindings}),
        }
