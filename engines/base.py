"""The runner interface every backend implements, and the input checks they share.

A runner walks a bundle's plan (docs/bundle.md) from noise and conditioning to the final
latents.  Like polygraphy's runners: ``activate`` allocates (sessions, engines, buffers),
``infer`` runs, ``deactivate`` frees, and a runner is a context manager.  Falling back from
TensorRT to ONNX Runtime is swapping the runner.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import REQUIRED

from rstr.errors import RstrError


class InputError(RstrError):
    """Inputs of the wrong shape, dtype or batch, or with NaN, or a class label out of range."""


class Runner(ABC):
    """Runs a bundle's whole plan.  Not re-entrant: ``infer`` holds a lock (one call at a time)."""

    backend: str = "abstract"

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.is_active = False
        self._lock = threading.Lock()

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(
        self,
        noise: np.ndarray,
        cond: dict[str, np.ndarray],
        uncond: dict[str, np.ndarray] | None = None,
        trace: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Final latents for ``noise`` and conditioning; ``trace`` (a list) receives x after each step."""
        if not self.is_active:
            raise RstrError(f"{type(self).__name__} is not active; use it as a context manager or call activate()")
        noise, cond, uncond = check_inputs(self.bundle, noise, cond, uncond)
        with self._lock:
            return self._infer(noise, cond, uncond, trace)

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def _infer(
        self, noise: np.ndarray, cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray] | None, trace: list[np.ndarray] | None
    ) -> np.ndarray: ...

    def describe(self) -> dict:
        """Backend and settings, for reports."""
        return {"backend": self.backend}


def check_inputs(bundle: Bundle, noise, cond, uncond):
    """Validate and convert user inputs against the manifest; fill the unconditional input."""
    b = bundle.batch
    want = bundle.sample.concrete(b)
    noise = np.asarray(noise)
    if noise.shape != want:
        raise InputError(f"noise has shape {noise.shape}, expected {want} (this bundle was built for batch {b})")
    if not np.issubdtype(noise.dtype, np.floating):
        raise InputError(f"noise has dtype {noise.dtype}, expected float32")
    if not np.isfinite(noise).all():
        raise InputError("noise contains NaN or infinite values")
    noise = np.ascontiguousarray(noise, dtype=np.float32)
    cond = _check_cond(bundle, cond, "conditioning")
    conditioning = bundle.manifest.conditioning
    if conditioning.num_classes is not None and "class_labels" in cond:
        labels = cond["class_labels"]
        bad = labels[(labels < 0) | (labels >= conditioning.num_classes)]
        if bad.size:
            raise InputError(
                f"class label {int(bad[0])} is out of range; this model has classes 0..{conditioning.num_classes - 1}"
            )
    if bundle.plan.num_guided:
        if uncond is None:
            uncond = {}
            for name, rule in conditioning.unconditional.items():
                if rule == REQUIRED:
                    raise InputError(
                        f"this bundle's guided steps need unconditional input {name!r} (negative-prompt embeddings); pass uncond="
                    )
                uncond[name] = np.full_like(cond[name], rule)
        uncond = _check_cond(bundle, uncond, "unconditional")
    return noise, cond, uncond


def _check_cond(bundle: Bundle, cond, what: str) -> dict[str, np.ndarray]:
    if not isinstance(cond, dict):
        raise InputError(f"{what} must be a dict of arrays keyed by {[d.name for d in bundle.cond_inputs]}")
    specs = {d.name: d for d in bundle.cond_inputs}
    missing, extra = sorted(set(specs) - set(cond)), sorted(set(cond) - set(specs))
    if missing or extra:
        raise InputError(f"{what}: expected inputs {sorted(specs)}; missing {missing}, unexpected {extra}")
    out = {}
    for name, spec in specs.items():
        arr = np.asarray(cond[name])
        want = spec.concrete(bundle.batch)
        if arr.shape != want:
            raise InputError(f"{what}: {name} has shape {arr.shape}, expected {want} (bundle batch {bundle.batch})")
        if np.issubdtype(spec.np_dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{what}: {name} has dtype {arr.dtype}, expected integers ({spec.dtype})")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InputError(f"{what}: {name} contains NaN or infinite values")
        out[name] = np.ascontiguousarray(arr, dtype=spec.np_dtype)
    return out
