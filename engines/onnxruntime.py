"""ONNX Runtime backend: CPU, or CUDA when onnxruntime-gpu and a GPU are present.

The plan is walked with I/O binding: every step's outputs are OrtValues on the execution
device and feed the next step directly, so on CUDA no tensor leaves the GPU between the
first and the last step.  Per-step constants (timestep rows, scale, coefficients) are made
into device OrtValues once, at activation.
"""

from __future__ import annotations

import os

import numpy as np

from rstr.engines.base import Runner
from rstr.engines.bundle import Bundle
from rstr.errors import BackendUnavailable

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


class OnnxRuntimeRunner(Runner):
    """Walks the plan with ONNX Runtime sessions for the denoiser and the two step graphs."""

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, optimization: str = "all"):
        super().__init__(bundle)
        if device not in ("cpu", "cuda"):
            raise BackendUnavailable(f"device {device!r} is not supported by the ONNX Runtime backend; use 'cpu' or 'cuda'")
        if device == "cuda" and not cuda_available():
            raise BackendUnavailable("the CUDA execution provider is not available; pip install 'rstr[gpu]' on a machine with an NVIDIA GPU")
        self.device = device
        self.backend = f"onnxruntime-{device}"
        self.threads = threads or os.cpu_count() or 1
        self.optimization = optimization
        self.sessions: dict[str, object] = {}

    def _session_options(self):
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts.log_severity_level = 3
        return opts

    def _value(self, array: np.ndarray):
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _activate(self) -> None:
        ort = _ort()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        opts = self._session_options()
        self.sessions = {g: ort.InferenceSession(str(self.bundle.graph_path(g)), opts, providers=providers) for g in GRAPHS}
        b = self.bundle.batch
        self.step_values = []
        for step in self.bundle.steps:
            rows = 2 * b if step["guided"] else b
            self.step_values.append({
                "timestep": self._value(np.full((rows,), step["model_timestep"], np.float32)),
                "scale": self._value(np.array([step["scale"] or 0.0], np.float32)),
                "coef_sample": self._value(np.array([step["coef_sample"]], np.float32)),
                "coef_eps": self._value(np.array([step["coef_eps"]], np.float32)),
            })

    def _deactivate(self) -> None:
        self.sessions = {}
        self.step_values = []

    def _infer(self, noise, cond, uncond, trace):
        sigma = np.float32(self.bundle.plan["init_noise_sigma"])
        x0 = noise * sigma
        x, x2 = self._value(x0), self._value(np.concatenate([x0, x0]))
        cond_b = {k: self._value(v) for k, v in cond.items()}
        cond_2b = {k: self._value(np.concatenate([v, uncond[k]])) for k, v in cond.items()} if uncond is not None else {}
        denoiser = self.sessions["denoiser"]
        for step, values in zip(self.bundle.steps, self.step_values):
            guided = step["guided"]
            binding = denoiser.io_binding()
            binding.bind_ortvalue_input("sample", x2 if guided else x)
            binding.bind_ortvalue_input("timestep", values["timestep"])
            for name, value in (cond_2b if guided else cond_b).items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("model_output", self.device)
            denoiser.run_with_iobinding(binding)
            model_output = binding.get_outputs()[0]

            session = self.sessions["step_guided" if guided else "step_single"]
            sb = session.io_binding()
            sb.bind_ortvalue_input("sample", x)
            sb.bind_ortvalue_input("model_output", model_output)
            if guided:
                sb.bind_ortvalue_input("scale", values["scale"])
            sb.bind_ortvalue_input("coef_sample", values["coef_sample"])
            sb.bind_ortvalue_input("coef_eps", values["coef_eps"])
            sb.bind_output("next_sample", self.device)
            sb.bind_output("next_sample_pair", self.device)
            session.run_with_iobinding(sb)
            x, x2 = sb.get_outputs()
            if trace is not None:
                trace.append(x.numpy())
        return x.numpy()

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "intra_op_threads": self.threads,
            "inter_op_threads": 1,
            "graph_optimization": self.optimization,
            "io_binding": True,
        }
