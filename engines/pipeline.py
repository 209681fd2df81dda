"""The Python embedding API: load a bundle once, then generate.

``Pipeline.load(bundle, backend="auto")`` picks TensorRT when it is installed, a GPU is
present and the bundle holds engines built for this TensorRT and GPU; otherwise it falls
back to ONNX Runtime (CUDA if available, else CPU) with a warning saying why.

Thread safety: a pipeline may be shared between threads; calls are serialised by the
runner's lock (one generation at a time per pipeline).  Load one pipeline per thread for
parallel generation.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from rstr.engines.base import Runner
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import Decoder

from rstr.errors import BackendUnavailable, RstrError

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda")


@dataclass(frozen=True)
class Result:
    """Final latents ``[B, ...]`` and, when the bundle has a decoder (pixels or a VAE graph), images ``[B, H, W, C]`` in [0, 1]."""

    latents: np.ndarray
    images: np.ndarray | None


def make_runner(bundle: Bundle, backend: str = "auto") -> Runner:
    """The runner for ``backend``; ``auto`` falls back from TensorRT to ONNX Runtime with a warning.

    A TensorRT runner is returned already active, so that an engine that fails to load
    (another GPU, another TensorRT) also falls back under ``auto``.
    """
    from rstr.engines.onnxruntime import OnnxRuntimeRunner, cuda_available

    if backend not in BACKENDS:
        raise RstrError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend in ("auto", "tensorrt"):
        from rstr.engines.tensorrt import TensorRTRunner

        try:
            runner = TensorRTRunner(bundle)
            runner.activate()
            return runner
        except BackendUnavailable as why:
            if backend == "tensorrt":
                raise
            fallback = "cuda" if cuda_available() else "cpu"
            warnings.warn(f"TensorRT not used ({why}); falling back to ONNX Runtime ({fallback})", stacklevel=3)
            return OnnxRuntimeRunner(bundle, device=fallback)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(bundle, device="cuda" if cuda_available() else "cpu")
    return OnnxRuntimeRunner(bundle, device=backend.removeprefix("onnxruntime-"))


class ImageDecoder:
    """Final latents to images ``[B, H, W, C]`` in [0, 1] by the bundle's decoder.

    ``pixels``: the latents are the image; ``vae``: the bundle's ``vae_decoder`` graph, run by ONNX
    Runtime (CUDA when available, else CPU) whatever backend walked the plan; no decoder: None.
    """

    def __init__(self, bundle: Bundle):
        from rstr.engines.onnxruntime import cuda_available, open_session

        self.decoder = bundle.decoder
        self.session = None
        if self.decoder is not None and self.decoder.kind == "vae":
            self.session = open_session(bundle, self.decoder.graph, "cuda" if cuda_available() else "cpu")

    def __call__(self, latents: np.ndarray) -> np.ndarray | None:
        if self.session is not None:
            return self.session.run(["images"], {"latents": np.ascontiguousarray(latents, dtype=np.float32)})[0]
        return decode(self.decoder, latents)

    def close(self) -> None:
        self.session = None


class Pipeline:
    """A loaded bundle with an active runner and its image decoder."""

    def __init__(self, bundle: Bundle, runner: Runner):
        self.bundle = bundle
        self.runner = runner
        self.decoder = ImageDecoder(bundle)
        self._prompts = None  # the PromptEncoder, loaded on the first call with prompts
        self._prompts_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str = "auto") -> Pipeline:
        bundle = Bundle.open(path)
        runner = make_runner(bundle, backend)
        runner.activate()
        return cls(bundle, runner)

    def close(self) -> None:
        self.runner.deactivate()
        self.decoder.close()
        self._prompts = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend(self) -> str:
        return self.runner.backend

    def noise(self, seed: int) -> np.ndarray:
        """Standard normal noise of the bundle's sample shape from numpy's PCG64 with ``seed``."""
        shape = self.bundle.sample.concrete(self.bundle.batch)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def __call__(
        self,
        conditioning: dict | None = None,
        *,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        uncond: dict | None = None,
        seed: int | None = None,
        noise: np.ndarray | None = None,
    ) -> Result:
        """Generate from conditioning (e.g. ``{"class_labels": [3]}``) or a ``prompt``, and either ``seed`` or ``noise``.

        ``prompt`` (bundles with text encoders): one string for every row, or B strings; the
        negative prompt of guided steps defaults to the bundle's (``""``).  Inputs no encoder
        fills (FLUX's distilled ``guidance``) come in ``conditioning``.
        """
        if (seed is None) == (noise is None):
            raise RstrError("give exactly one of seed= or noise=")
        if noise is None:
            noise = self.noise(seed)
        conditioning = {k: np.asarray(v) for k, v in (conditioning or {}).items()}
        if prompt is not None:
            conditioning, uncond = self._from_prompts(prompt, negative_prompt, conditioning, uncond)
        elif negative_prompt is not None:
            raise RstrError("negative_prompt= needs prompt=")
        latents = self.runner.infer(noise, conditioning, uncond)
        return Result(latents, self.decoder(latents))

    def _rows(self, text: str | list[str], what: str) -> list[str]:
        b = self.bundle.batch
        rows = [text] * b if isinstance(text, str) else list(text)
        if len(rows) != b or not all(isinstance(r, str) for r in rows):
            raise RstrError(f"{what} must be a string or {b} strings (this bundle runs batch {b})")
        return rows

    def _from_prompts(self, prompt, negative_prompt, extra: dict, uncond: dict | None) -> tuple[dict, dict | None]:
        """Conditioning (and, for guided steps, unconditional rows) from prompts through the bundle's text encoders."""
        from rstr.engines.text import PromptEncoder

        with self._prompts_lock:
            if self._prompts is None:
                self._prompts = PromptEncoder(self.bundle)
        encoder = self._prompts
        cond = {**encoder(self._rows(prompt, "prompt")), **extra}
        if uncond is None and self.bundle.plan.num_guided:
            negative = encoder.negative_prompt if negative_prompt is None else negative_prompt
            uncond = {**extra, **encoder(self._rows(negative, "negative_prompt"))}
        return cond, uncond


def decode(decoder: Decoder | None, latents: np.ndarray) -> np.ndarray | None:
    """Images in [0, 1], ``[B, H, W, C]``, for bundles whose latents are pixels; else None."""
    if decoder is None or decoder.kind != "pixels":
        return None
    lo, hi = decoder.range
    return np.clip((latents - lo) / (hi - lo), 0.0, 1.0).transpose(0, 2, 3, 1)
