"""The native libraries of the TensorRT backend, imported lazily: TensorRT, and the few CUDA runtime calls
it makes through cuda-python (not torch: ``rstr.engines`` runs without torch).

Nothing is imported when this module is; each import failure is one
:class:`~rstr.errors.BackendUnavailable` line with the fix.
"""

from __future__ import annotations

import numpy as np

from rstr.errors import BackendUnavailable

_LOGGER = None


def load_tensorrt():
    """The tensorrt module, or BackendUnavailable."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (pip install 'rstr[tensorrt]' from NVIDIA's package index)") from None
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and others at import
        raise BackendUnavailable(
            f"TensorRT is installed but cannot be imported ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    return tensorrt


def trt_logger(trt):
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


class Cuda:
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


def gpu(device: int) -> tuple[Cuda, str, str]:
    """cuda-python, this device's name and compute capability, or BackendUnavailable."""
    cuda = Cuda()
    count, why = cuda.device_count()
    if count == 0:
        raise BackendUnavailable(f"no CUDA GPU is usable on this machine ({why or 'no device found'})")
    if not 0 <= device < count:
        raise BackendUnavailable(f"GPU {device} does not exist; this machine has {count} (0..{count - 1})")
    name, cc = cuda.device_info(device)
    return cuda, name, cc
