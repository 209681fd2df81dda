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


class InactiveError(RstrError):
    """A runner (or pipeline) used before activation or after it was closed."""


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
        with self._lock:
            if not self.is_active:
                self._activate()
                self.is_active = True

    def deactivate(self) -> None:
        """Free the backend; waits for a generation in progress (on another thread) to finish."""
        with self._lock:
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
        noise, cond, uncond = check_inputs(self.bundle, noise, cond, uncond)
        with self._lock:
            if not self.is_active:
                raise InactiveError(
                    f"{type(self).__name__} is not active (closed, or never activated); use it as a context manager "
                    "or call activate()"
                )
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
    noise = _array(noise, "noise")
    if noise.shape != want:
        raise InputError(f"noise has shape {noise.shape}, expected {want} (this bundle was built for batch {b})")
    if noise.dtype.kind != "f":
        raise InputError(f"noise has dtype {noise.dtype}, expected float32")
    if not np.isfinite(noise).all():
        raise InputError("noise contains NaN or infinite values")
    noise = np.ascontiguousarray(noise, dtype=np.float32)
    cond = _check_cond(bundle, cond, "conditioning")
    conditioning = bundle.manifest.conditioning
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


def _array(value, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as err:
        raise InputError(f"{what} is not an array ({str(err).splitlines()[0]})") from None


def _check_classes(bundle: Bundle, name: str, labels: np.ndarray, what: str) -> None:
    """Class labels lie in 0..num_classes-1; unconditional rows may also hold the input's null (fill) class."""
    n = bundle.manifest.conditioning.num_classes
    if n is None:
        return
    fill = bundle.manifest.conditioning.unconditional.get(name)
    null = fill if what == "unconditional" and fill != REQUIRED else None
    outside = (labels < 0) | (labels >= n)
    if null is not None:
        outside &= labels != null
    bad = labels[outside]
    if bad.size:
        also = f" and the null class {int(null)}" if null is not None else ""
        label = "unconditional class label" if what == "unconditional" else "class label"
        raise InputError(f"{label} {int(bad[0])} is out of range; this model has classes 0..{n - 1}{also}")


def _check_cond(bundle: Bundle, cond, what: str) -> dict[str, np.ndarray]:
    if not isinstance(cond, dict):
        raise InputError(
            f"{what} must be a dict of arrays keyed by {[d.name for d in bundle.cond_inputs]} (got {type(cond).__name__})"
        )
    specs = {d.name: d for d in bundle.cond_inputs}
    missing, extra = sorted(set(specs) - set(cond)), sorted(set(cond) - set(specs))
    if missing or extra:
        raise InputError(f"{what}: expected inputs {sorted(specs)}; missing {missing}, unexpected {extra}")
    out = {}
    for name, spec in specs.items():
        arr = _array(cond[name], f"{what}: {name}")
        want = spec.concrete(bundle.batch)
        if arr.shape != want:
            raise InputError(f"{what}: {name} has shape {arr.shape}, expected {want} (bundle batch {bundle.batch})")
        integer = np.issubdtype(spec.np_dtype, np.integer)
        if arr.dtype.kind not in ("iu" if integer else "iuf"):
            raise InputError(
                f"{what}: {name} has dtype {arr.dtype}, expected {'integers' if integer else 'numbers'} ({spec.dtype})"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"{what}: {name} contains NaN or infinite values")
        if integer:
            _check_classes(bundle, name, arr, what)
        out[name] = np.ascontiguousarray(arr, dtype=spec.np_dtype)
    return out
