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
from rstr.engines.noise import standard_normal
from rstr.engines.onnxruntime import OnnxRuntimeRunner
from rstr.engines.validate import entry_problem

from rstr.errors import RstrError
from rstr.families.base import Conditioning, Family
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


def recorded_model(bundle: Bundle, model: Path | None = None) -> Path:
    """The model to verify ``bundle`` against: ``model`` when given, else the path in its provenance, but
    only when that exists and its files still hash to the recorded ``model_sha256`` (provenance is
    information, not an instruction to load whatever sits at a path)."""
    from rstr.families import model_sha256

    if model is not None:
        return model
    prov = bundle.manifest.provenance
    path = Path(prov.model)
    if prov.model_sha256 is None:
        raise RstrError(
            f"bundle {bundle.root} records no hash of its model, so its recorded path {path} is not trusted; "
            "pass --model with the model it was built from"
        )
    if not path.is_dir():
        raise RstrError(f"bundle {bundle.root} was built from {path}, which is not on this machine; pass --model")
    if model_sha256(path) != prov.model_sha256:
        raise RstrError(
            f"the model at {path} is not the one bundle {bundle.root} was built from (its files hash differently); "
            "pass --model with the right model"
        )
    return path


def bundled_adapter(bundle: Bundle) -> Path | None:
    """The bundle's own copy of the merged adapter (``provenance.adapter``), or None when none was merged.

    It must lie inside the bundle with every file listed in ``files`` (so checked at open: hashed,
    no symbolic links) and hash to ``provenance.adapter_sha256``; an adapter elsewhere is never loaded.
    """
    from rstr.calibrate import ADAPTER_FILES, adapter_sha256

    prov = bundle.manifest.provenance
    if prov.adapter is None:
        return None
    problem = entry_problem(prov.adapter)
    if problem is not None:
        raise RstrError(f"bundle {bundle.root}: provenance.adapter {prov.adapter!r} is not inside the bundle ({problem})")
    listed = {name for name in bundle.manifest.files if name.startswith(prov.adapter + "/")}
    missing = [name for name in ADAPTER_FILES if f"{prov.adapter}/{name}" not in listed]
    if missing:
        raise RstrError(f"bundle {bundle.root}: the adapter's {missing[0]} is not listed in files; rebuild the bundle")
    directory = bundle.member(f"{prov.adapter}/{ADAPTER_FILES[0]}").parent
    unlisted = sorted(p.relative_to(bundle.root).as_posix() for p in directory.rglob("*") if not p.is_dir())
    unlisted = [name for name in unlisted if name not in listed]
    if unlisted:
        raise RstrError(f"bundle {bundle.root}: {unlisted[0]} sits in the adapter but is not listed in files; rebuild the bundle")
    if prov.adapter_sha256 is None or adapter_sha256(directory) != prov.adapter_sha256.lower():
        raise RstrError(
            f"bundle {bundle.root}: the adapter in {prov.adapter} does not match provenance.adapter_sha256; rebuild the bundle"
        )
    return directory


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
    with tempfile.TemporaryDirectory(prefix="rstr-verify-") as tmp:
        from rstr.export.precision import cpu_checkable

        checked = cpu_checkable(bundle, Path(tmp))  # a bf16 graph runs emulated: ONNX Runtime CPU has no bf16 kernels
        with OnnxRuntimeRunner(checked, device="cpu") as runner:
            got = runner.infer(noise, cond, uncond, trace=trace)
        backend = runner.backend + (" (bf16 emulated)" if checked is not bundle else "")
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
    result = Verification(rel(got, expected), tolerance(bundle), per_step, backend)
    if raise_on_failure and not result.passed:
        first = next((i for i, e in enumerate(per_step) if e > result.tolerance), len(per_step) - 1)
        steps = ", ".join(f"{i}:{e:.1e}" for i, e in enumerate(per_step))
        raise VerificationError(
            f"bundle differs from PyTorch: max relative error {result.max_rel_error:.2e} > "
            f"{result.tolerance:.0e}, first at step {first} (per step {steps})"
        )
    return result
