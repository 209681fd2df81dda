"""Check a bundle against the PyTorch sampler from the same noise and conditioning.

The bundle runs through ONNX Runtime on the CPU; the reference is :func:`rstr.sampler.sample`
on the (merged) PyTorch model with the bundle's own schedule.  fp32 bundles must agree to
1e-4 relative on the final latents; on failure the per-step table says where they diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rstr.engines.bundle import Bundle
from rstr.engines.noise import standard_normal
from rstr.engines.onnxruntime import OnnxRuntimeRunner

from rstr.errors import RstrError
from rstr.families.base import Conditioning, Family
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


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


Arrays = dict[str, np.ndarray]


def as_arrays(cond: Conditioning, uncond: Conditioning | None) -> tuple[Arrays, Arrays | None]:
    """Conditioning and its unconditional counterpart (when the family has one) as the runtime's arrays."""
    to_np = lambda c: {k: v.cpu().numpy() for k, v in c.items()}  # noqa: E731
    return to_np(cond), None if uncond is None else to_np(uncond)


def example_inputs(family: Family, batch: int, seed: int = 0) -> tuple[Arrays, Arrays | None]:
    """The family's deterministic example conditioning (:meth:`Family.example_conditioning`) as arrays."""
    return as_arrays(*family.example_conditioning(batch, seed))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def verify(
    bundle: Bundle, family: Family, schedule: GuidanceSchedule, *, seed: int = 0, raise_on_failure: bool = True
) -> Verification:
    """Run the bundle (ONNX Runtime, CPU) and the PyTorch sampler from the same noise; compare."""
    b = bundle.batch
    noise = standard_normal(seed, bundle.sample.concrete(b))  # rstr's seeded noise, as `rstr-export run --seed`
    cond, uncond = example_inputs(family, b, seed)
    trace: list[np.ndarray] = []
    with OnnxRuntimeRunner(bundle, device="cpu") as runner:
        got = runner.infer(noise, cond, uncond, trace=trace)
    ref_trace: list[np.ndarray] = []
    to_t = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    expected = (
        sample(
            family,
            schedule,
            to_t(cond),
            uncond=None if uncond is None else to_t(uncond),
            noise=torch.from_numpy(noise),
            callback=lambda s: ref_trace.append(s.next_sample.cpu().numpy()),
        )
        .cpu()
        .numpy()
    )
    per_step = [rel(x, y) for x, y in zip(trace, ref_trace)]
    result = Verification(rel(got, expected), TOLERANCE[bundle.manifest.dtype], per_step, runner.backend)
    if raise_on_failure and not result.passed:
        first = next((i for i, e in enumerate(per_step) if e > result.tolerance), len(per_step) - 1)
        steps = ", ".join(f"{i}:{e:.1e}" for i, e in enumerate(per_step))
        raise VerificationError(
            f"bundle differs from PyTorch: max relative error {result.max_rel_error:.2e} > "
            f"{result.tolerance:.0e}, first at step {first} (per step {steps})"
        )
    return result
