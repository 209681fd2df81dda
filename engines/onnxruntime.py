"""ONNX Runtime backend: CPU, or CUDA when onnxruntime-gpu and a GPU are present.

The plan is walked with I/O binding over buffers allocated once, at activation: the latents
ping-pong between two pairs of device buffers (``x [B]`` and ``x2 [2B] = [x; x]``), the
denoiser writes into one output buffer per batch, and every step's two bindings (denoiser,
step graph) are built at activation with its constants (timestep rows, scale, coefficients)
as device values.  Multistep plans (``plan.history`` k > 0) add a ping-pong pair of history
buffers ``[B, k, 2, ...]`` that the step graphs read and write, zeroed at the start of each
run.  ``infer`` copies the noise and conditioning in, runs two session calls per step and
copies the final latents out: no tensor leaves the device in between and no Python work per
step beyond the two calls.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from rstr.engines.base import Runner
from rstr.engines.bundle import Bundle

from rstr.errors import BackendUnavailable, BundleError

GRAPHS = ("denoiser", "step_guided", "step_single")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("ONNX Runtime is not installed; pip install 'rstr[cpu]' (or 'rstr[gpu]' for CUDA)") from None
    return onnxruntime


def cuda_available() -> bool:
    """True when this onnxruntime build has the CUDA provider (a GPU is then required to use it)."""
    try:
        return "CUDAExecutionProvider" in _ort().get_available_providers()
    except BackendUnavailable:
        return False


def session_options(threads: int, optimization: str = "all", prepack: bool = True):
    """One intra-op pool of ``threads``, sequential execution, the graph optimisation level by name.

    ``prepack=False`` keeps ONNX Runtime from copying the weights into its packed GEMM layout: for a
    one-shot run (verification) that copy is only memory (2.7 GB for a DiT-XL/2-shaped fp32 graph).
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def open_session(
    bundle: Bundle, graph: str, device: str = "cpu", threads: int | None = None, optimization: str = "all", prepack: bool = True
):
    """An ONNX Runtime session of one bundle graph; a graph it cannot load is one :class:`BundleError` line."""
    ort = _ort()
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    path = bundle.graph_path(graph)
    try:
        return ort.InferenceSession(
            str(path), session_options(threads or os.cpu_count() or 1, optimization, prepack), providers=providers
        )
    except (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.NotImplemented, state.NoSuchFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(f"{path.name}: ONNX Runtime ({device}) cannot load it ({first})") from None


class OnnxRuntimeRunner(Runner):
    """Walks the plan with ONNX Runtime sessions for the denoiser and the two step graphs."""

    def __init__(
        self, bundle: Bundle, device: str = "cpu", threads: int | None = None, optimization: str = "all", prepack: bool = True
    ):
        super().__init__(bundle)
        if device not in ("cpu", "cuda"):
            raise BackendUnavailable(f"device {device!r} is not supported by the ONNX Runtime backend; use 'cpu' or 'cuda'")
        if device == "cuda" and not cuda_available():
            raise BackendUnavailable(
                "the CUDA execution provider is not available; pip install 'rstr[gpu]' on a machine with an NVIDIA GPU"
            )
        if device == "cpu" and bundle.manifest.precision == "bf16":
            raise BackendUnavailable(
                "this bundle computes in bf16 (precision bf16), which ONNX Runtime's CPU provider cannot run (no bf16 "
                "MatMul/Gemm kernels); run it with TensorRT or ONNX Runtime CUDA, or rebuild it with --precision fp32 or int8"
            )
        self.device = device
        self.backend = f"onnxruntime-{device}"
        self.threads = threads or os.cpu_count() or 1
        self.optimization = optimization
        self.prepack = prepack
        self.sessions: dict[str, Any] = {}  # onnxruntime ships no types

    def _value(self, array: np.ndarray):
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _buffer(self, shape: tuple[int, ...], dtype) -> Any:
        return _ort().OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)

    def _activate(self) -> None:
        self.sessions = {
            g: open_session(self.bundle, g, self.device, self.threads, self.optimization, self.prepack) for g in GRAPHS
        }
        b, sample = self.bundle.batch, self.bundle.sample.concrete(self.bundle.batch)
        pair = (2 * b,) + sample[1:]
        out = self.bundle.graph_outputs("denoiser")[0]
        # Latents by parity of the step index: step i reads x[i % 2] and writes x[(i + 1) % 2].
        self.x = [self._buffer(sample, np.float32) for _ in range(2)]
        self.x2 = [self._buffer(pair, np.float32) for _ in range(2)]
        self.cond = {
            rows: {d.name: self._buffer(d.concrete(rows), d.np_dtype) for d in self.bundle.cond_inputs} for rows in (b, 2 * b)
        }
        model_output = {rows: self._buffer(out.concrete(rows), out.np_dtype) for rows in (b, 2 * b)}
        k = self.bundle.plan.history
        self.history = [self._buffer((b, k, 2, *sample[1:]), np.float32) for _ in range(2)] if k else []
        self.walk = []
        for i, step in enumerate(self.bundle.steps):
            guided, now, nxt = step.guided, i % 2, (i + 1) % 2
            rows = self.bundle.plan.rows(guided)
            den = self.sessions["denoiser"].io_binding()
            den.bind_ortvalue_input("sample", self.x2[now] if guided else self.x[now])
            den.bind_ortvalue_input("timestep", self._value(np.full((rows,), step.model_timestep, np.float32)))
            for name, value in self.cond[rows].items():
                den.bind_ortvalue_input(name, value)
            den.bind_ortvalue_output("model_output", model_output[rows])
            graph = "step_guided" if guided else "step_single"
            upd = self.sessions[graph].io_binding()
            upd.bind_ortvalue_input("sample", self.x[now])
            upd.bind_ortvalue_input("model_output", model_output[rows])
            if guided:
                upd.bind_ortvalue_input("scale", self._value(np.array([step.scale or 0.0], np.float32)))
            coef_sample, coef_eps = step.coefficients(k)
            upd.bind_ortvalue_input("coef_sample", self._value(np.array(coef_sample, np.float32)))
            upd.bind_ortvalue_input("coef_eps", self._value(np.array(coef_eps, np.float32)))
            upd.bind_ortvalue_output("next_sample", self.x[nxt])
            upd.bind_ortvalue_output("next_sample_pair", self.x2[nxt])
            if k:
                upd.bind_ortvalue_input("history", self.history[now])
                upd.bind_ortvalue_output("next_history", self.history[nxt])
            self.walk.append((den, graph, upd, self.x[nxt]))

    def _deactivate(self) -> None:
        self.sessions, self.walk, self.x, self.x2, self.cond, self.history = {}, [], [], [], {}, []

    def _infer(self, noise, cond, uncond, trace):
        b = self.bundle.batch
        x0 = noise * np.float32(self.bundle.plan.init_noise_sigma)
        self.x[0].update_inplace(x0)
        self.x2[0].update_inplace(np.concatenate([x0, x0]))
        if self.history:  # no past yet: the first steps' past coefficients are 0, and 0 * stale NaN is not
            self.history[0].update_inplace(np.zeros(self.history[0].shape(), np.float32))
        for name, value in cond.items():
            self.cond[b][name].update_inplace(value)
            if uncond is not None:
                self.cond[2 * b][name].update_inplace(np.concatenate([value, uncond[name]]))
        for den, graph, upd, x_next in self.walk:
            self.sessions["denoiser"].run_with_iobinding(den)
            self.sessions[graph].run_with_iobinding(upd)
            if trace is not None:
                trace.append(x_next.numpy().copy())
        return self.x[len(self.walk) % 2].numpy().copy()  # a copy: the buffer is reused by the next call

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "intra_op_threads": self.threads,
            "inter_op_threads": 1,
            "graph_optimization": self.optimization,
            "io_binding": True,
        }
