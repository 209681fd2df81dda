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
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rstr.engines.base import InputError, Runner
from rstr.engines.bundle import Bundle
from rstr.engines.endpoints import Decoder
from rstr.engines.noise import standard_normal

from rstr.errors import BackendUnavailable

if TYPE_CHECKING:
    from rstr.engines.text import ClassTable, PromptEncoder

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda")
log = logging.getLogger("rstr")


@dataclass(frozen=True)
class Result:
    """Final latents ``[B, ...]`` and, when the bundle has a decoder (pixels or a VAE graph), images ``[B, H, W, C]`` in [0, 1]."""

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


class ImageDecoder:
    """Final latents to images ``[B, H, W, C]`` in [0, 1] by the bundle's decoder.

    ``pixels``: the latents are the image; ``vae``: the bundle's ``vae_decoder`` graph, run by ONNX
    Runtime (CUDA when available, else CPU) whatever backend walked the plan; no decoder: None.
    """

    def __init__(self, bundle: Bundle):
        from rstr.engines.onnxruntime import cuda_available, open_session

        self.decoder = bundle.decoder
        self.session = None
        if self.decoder is not None and self.decoder.graph is not None:  # a vae decoder (the validator's rule)
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
        self._prompts: PromptEncoder | None = None  # loaded on the first call with prompts
        self._classes: ClassTable | None = None  # loaded on the first call with class labels (bundles with a class table)
        self._prompts_lock = threading.Lock()

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
        self.decoder.close()
        self._prompts = None
        self._classes = None

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
        fills (FLUX's distilled ``guidance``) come in ``conditioning``.  Bundles with a class table
        (``manifest.classes``) take ``{"class_labels": ...}`` too: the table's rows are the
        conditioning, its empty prompt the guided steps' unconditional input.
        """
        if (seed is None) == (noise is None):
            raise InputError("give exactly one of seed= or noise=")
        if noise is None:
            assert seed is not None  # exactly one was given
            noise = self.noise(seed)
        if prompt is not None:
            conditioning, uncond = self._from_prompts(prompt, negative_prompt, conditioning, uncond)
        elif negative_prompt is not None:
            raise InputError("negative_prompt= needs prompt=")
        elif self.bundle.manifest.classes is not None and isinstance(conditioning, dict) and "class_labels" in conditioning:
            conditioning, uncond = self._from_classes(conditioning, uncond)
        latents = self.runner.infer(noise, {} if conditioning is None else conditioning, uncond)
        return Result(latents, self.decoder(latents))

    def _rows(self, text: str | list[str], what: str) -> list[str]:
        b = self.bundle.batch
        rows = [text] * b if isinstance(text, str) else list(text)
        if len(rows) != b or not all(isinstance(r, str) for r in rows):
            raise InputError(f"{what} must be a string or {b} strings (this bundle runs batch {b})")
        return rows

    def _from_prompts(self, prompt, negative_prompt, extra: dict | None, uncond: dict | None) -> tuple[dict, dict | None]:
        """Conditioning (and, for guided steps, unconditional rows) from prompts through the bundle's text encoders."""
        from rstr.engines.text import PromptEncoder

        if extra is None:
            extra = {}
        elif not isinstance(extra, dict):
            raise InputError(f"conditioning must be a dict of arrays, got {type(extra).__name__}")

        with self._prompts_lock:
            if self._prompts is None:
                self._prompts = PromptEncoder(self.bundle)
        encoder = self._prompts
        cond = {**encoder(self._rows(prompt, "prompt")), **extra}
        if uncond is None and self.bundle.plan.num_guided:
            negative = encoder.negative_prompt if negative_prompt is None else negative_prompt
            uncond = {**extra, **encoder(self._rows(negative, "negative_prompt"))}
        return cond, uncond

    def _from_classes(self, conditioning: dict, uncond: dict | None) -> tuple[dict, dict | None]:
        """Conditioning (and, for guided steps, the empty prompt's rows) from class labels through the class table."""
        from rstr.engines.text import ClassTable

        with self._prompts_lock:
            if self._classes is None:
                self._classes = ClassTable(self.bundle)
        table = self._classes
        extra = {k: v for k, v in conditioning.items() if k != "class_labels"}
        cond = {**table(conditioning["class_labels"]), **extra}
        if uncond is None and self.bundle.plan.num_guided:
            uncond = {**table.negative(), **extra}
        return cond, uncond


def decode(decoder: Decoder | None, latents: np.ndarray) -> np.ndarray | None:
    """Images in [0, 1], ``[B, H, W, C]``, for bundles whose latents are pixels (``[B, C, H, W]``, or 2x2-packed
    ``[B, H*W/4, 4C]`` as FLUX and Qwen-Image pack them); else None."""
    if decoder is None or decoder.kind != "pixels":
        return None
    lo, hi = decoder.range
    if latents.ndim == 3:  # packed: token (h, w) holds channels x 2 x 2 pixels
        b, c, s = len(latents), decoder.channels, decoder.size
        latents = latents.reshape(b, s // 2, s // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, s, s)
    return np.clip((latents - lo) / (hi - lo), 0.0, 1.0).transpose(0, 2, 3, 1)
