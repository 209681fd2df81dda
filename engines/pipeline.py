"""The Python embedding API: load a bundle once, then generate.

``Pipeline.load(bundle, backend="auto")`` picks TensorRT when it is installed, a GPU is
present and the bundle holds engines built for this TensorRT and GPU; otherwise it falls
back to ONNX Runtime (CUDA if available, else CPU) and logs one line saying why (logger
``rstr``, level WARNING).  Engines built version-compatible embed TensorRT's lean runtime as
host code that runs when they load; they are used only with ``trust_engine_host_code=True``,
which says that you trust the bundle's author as you would trust a program from them.

Every error the API raises is an :class:`~rstr.errors.RstrError` subclass with one line:
:class:`~rstr.errors.BundleError`, :class:`~rstr.errors.BackendUnavailable`,
:class:`~rstr.engines.base.InputError`, :class:`~rstr.engines.base.InactiveError`.

Thread safety: a pipeline may be shared between threads; calls are serialised by the
runner's lock (one generation at a time per pipeline).  Load one pipeline per thread for
parallel generation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from rstr.engines.base import InputError, Runner
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import Decoder
from rstr.engines.noise import standard_normal

from rstr.errors import BackendUnavailable

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda")
log = logging.getLogger("rstr")


@dataclass(frozen=True)
class Result:
    """Final latents ``[B, ...]`` and, when the bundle has a decoder, images ``[B, H, W, C]`` in [0, 1]."""

    latents: np.ndarray
    images: np.ndarray | None


def make_runner(bundle: Bundle, backend: str = "auto", *, trust_engine_host_code: bool = False) -> Runner:
    """The runner for ``backend``; ``auto`` falls back from TensorRT to ONNX Runtime, logging one line.

    A TensorRT runner is returned already active, so that an engine that fails to load
    (another GPU, another TensorRT) also falls back under ``auto``.  ``trust_engine_host_code``:
    see the module docstring.
    """
    from rstr.engines.onnxruntime import OnnxRuntimeRunner, cuda_available

    if backend not in BACKENDS:
        raise BackendUnavailable(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend in ("auto", "tensorrt"):
        from rstr.engines.tensorrt import TensorRTRunner

        try:
            runner = TensorRTRunner(bundle, trust_engine_host_code=trust_engine_host_code)
            runner.activate()
            return runner
        except BackendUnavailable as why:
            if backend == "tensorrt":
                raise
            fallback = "cuda" if cuda_available() else "cpu"
            log.warning(f"TensorRT not used ({why}); falling back to ONNX Runtime ({fallback})")
            return OnnxRuntimeRunner(bundle, device=fallback)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(bundle, device="cuda" if cuda_available() else "cpu")
    return OnnxRuntimeRunner(bundle, device=backend.removeprefix("onnxruntime-"))


class Pipeline:
    """A loaded bundle with an active runner."""

    def __init__(self, bundle: Bundle, runner: Runner):
        self.bundle = bundle
        self.runner = runner

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str = "auto", *, trust_engine_host_code: bool = False) -> Pipeline:
        """Open and check the bundle at ``path`` and activate a runner for ``backend`` (:data:`BACKENDS`)."""
        bundle = Bundle.open(path)
        runner = make_runner(bundle, backend, trust_engine_host_code=trust_engine_host_code)
        runner.activate()
        return cls(bundle, runner)

    def close(self) -> None:
        """Free the runner; a generation in progress on another thread finishes first, later calls raise InactiveError."""
        self.runner.deactivate()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend(self) -> str:
        return self.runner.backend

    def noise(self, seed: int) -> np.ndarray:
        """rstr's seeded noise of the bundle's sample shape (:mod:`rstr.engines.noise`; ``rstr-run --seed`` draws the same)."""
        return standard_normal(seed, self.bundle.sample.concrete(self.bundle.batch))

    def __call__(
        self, conditioning: dict, *, uncond: dict | None = None, seed: int | None = None, noise: np.ndarray | None = None
    ) -> Result:
        """Generate from conditioning (e.g. ``{"class_labels": [3]}``) and either ``seed`` or ``noise``."""
        if (seed is None) == (noise is None):
            raise InputError("give exactly one of seed= or noise=")
        if noise is None:
            assert seed is not None  # exactly one was given
            noise = self.noise(seed)
        latents = self.runner.infer(noise, conditioning, uncond)
        return Result(latents, decode(self.bundle.decoder, latents))


def decode(decoder: Decoder | None, latents: np.ndarray) -> np.ndarray | None:
    """Images in [0, 1], ``[B, H, W, C]``, for bundles whose latents are pixels; else None."""
    if decoder is None or decoder.kind != "pixels":
        return None
    lo, hi = decoder.range
    return np.clip((latents - lo) / (hi - lo), 0.0, 1.0).transpose(0, 2, 3, 1)
