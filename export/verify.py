"""Check a bundle against the PyTorch sampler from the same noise and conditioning.

The bundle runs through ONNX Runtime on the CPU; the reference is :func:`rstr.sampler.sample`
on the (merged) PyTorch model with the bundle's own schedule.  fp32 bundles must agree to
1e-4 relative on the final latents, reduced-precision ones (:mod:`rstr.export.precision`) to
their own tolerance (:data:`PRECISION_TOLERANCE`, docs/bundle.md: it catches a wrong graph, not
the quality loss, which the precision gate measures); on failure the per-step table says where
they diverge.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rstr.engines.bundle import Bundle
from rstr.engines.onnxruntime import OnnxRuntimeRunner

from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
# Reduced-precision denoisers (rstr.export.precision), by manifest.precision: measured errors and margins in docs/bundle.md.
PRECISION_TOLERANCE = {"bf16": 5e-2, "int8": 2.5e-1, "int8-dynamic": 1e-1}


def tolerance(bundle: Bundle) -> float:
    """The verification tolerance of a bundle: by its precision when reduced after export, else by its export dtype."""
    p = bundle.manifest.precision
    return PRECISION_TOLERANCE[p] if p != "fp32" else TOLERANCE[bundle.manifest.dtype]


class VerificationError(RstrError):
    """The bundle's output differs from PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class Verification:
    max_rel_error: float
    tolerance: float
    per_step: list[float]
    backend: str

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "per_step_rel_error": self.per_step,
        }


def example_inputs(family: Family, batch: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The family's deterministic example conditioning (:meth:`Family.example_conditioning`) as arrays."""
    cond, uncond = family.example_conditioning(batch, seed)
    to_np = lambda c: {k: v.cpu().numpy() for k, v in c.items()}  # noqa: E731
    return to_np(cond), None if uncond is None else to_np(uncond)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def verify(
    bundle: Bundle, family: Family, schedule: GuidanceSchedule, *, seed: int = 0, raise_on_failure: bool = True
) -> Verification:
    """Run the bundle (ONNX Runtime, CPU) and the PyTorch sampler from the same noise; compare."""
    b = bundle.batch
    noise = np.random.default_rng(seed).standard_normal(bundle.sample.concrete(b), dtype=np.float32)
    cond, uncond = example_inputs(family, b, seed)
    trace: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="rstr-verify-") as tmp:
        from rstr.export.precision import cpu_checkable

        checked = cpu_checkable(bundle, Path(tmp))  # a bf16 graph runs emulated: ONNX Runtime CPU has no bf16 kernels
        with OnnxRuntimeRunner(checked, device="cpu") as runner:
            got = runner.infer(noise, cond, uncond, trace=trace)
        backend = runner.backend + (" (bf16 emulated)" if checked is not bundle else "")
    ref_trace: list[np.ndarray] = []
    to_t = lambda d: None if d is None else {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    expected = (
        sample(
            family,
            schedule,
            to_t(cond),
            uncond=to_t(uncond),
            noise=torch.from_numpy(noise),
            callback=lambda s: ref_trace.append(s.next_sample.cpu().numpy()),
        )
        .cpu()
        .numpy()
    )
    per_step = [rel(x, y) for x, y in zip(trace, ref_trace)]
    result = Verification(rel(got, expected), tolerance(bundle), per_step, backend)
    if raise_on_failure and not result.passed:
        first = next((i for i, e in enumerate(per_step) if e > result.tolerance), len(per_step) - 1)
        steps = ", ".join(f"{i}:{e:.1e}" for i, e in enumerate(per_step))
        raise VerificationError(
            f"bundle differs from PyTorch: max relative error {result.max_rel_error:.2e} > "
            f"{result.tolerance:.0e}, first at step {first} (per step {steps})"
        )
    return result
