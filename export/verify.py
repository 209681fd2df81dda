"""Check a bundle against the PyTorch sampler from the same noise and conditioning.

The bundle runs through ONNX Runtime on the CPU; the reference is :func:`rstr.sampler.sample`
on the (merged) PyTorch model, in the dtype the graph computes in, with the bundle's own
schedule.  fp32 bundles must agree to 1e-4 relative on the final latents, reduced-precision
ones (:mod:`rstr.export.precision`) to their own tolerance (:data:`PRECISION_TOLERANCE`,
docs/bundle.md: it catches a wrong graph, not the quality loss, which the precision gate
measures); on failure the per-step table says where they diverge.  The decoder and text
encoder graphs and the class table's are checked on their own (a half-precision VAE against an fp32 copy of it on the
CPU, where PyTorch's half-precision convolutions are very slow).  The reference is computed first
(:func:`reference_run`), so that a build can free the PyTorch weights before ONNX Runtime
loads the graphs (:func:`check_bundle`).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rstr.engines.bundle import Bundle
from rstr.engines.noise import standard_normal
from rstr.engines.onnxruntime import OnnxRuntimeRunner, open_session
from rstr.engines.validate import entry_problem
from rstr.export.classes import class_reference, has_class_table
from rstr.export.text import text_reference

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
    max_rel_error: float  # the final latents
    tolerance: float
    per_step: list[float]
    backend: str
    graphs: dict[str, float] = field(
        default_factory=dict
    )  # the other graphs (decoder, text encoders, class table), each on its own

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerance for e in (self.max_rel_error, *self.graphs.values()))

    def to_json(self) -> dict:
        out = {
            "backend": self.backend,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "per_step_rel_error": self.per_step,
        }
        return {**out, "graphs": self.graphs} if self.graphs else out


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


@dataclass(frozen=True)
class Reference:
    """What the PyTorch sampler gives from one draw of noise and conditioning: the bundle must match it."""

    noise: np.ndarray
    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray] | None
    latents: np.ndarray
    trace: list[np.ndarray]  # x after each step
    images: np.ndarray | None = None  # the latents through the model's VAE, when it has one
    text: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = field(default_factory=dict)  # encoder: (tokens, output)
    classes: tuple[dict[str, np.ndarray], list[np.ndarray]] | None = None  # every row's labels, the table's rows


@contextmanager
def _fp32_vae_on_cpu(family: Family) -> Iterator[None]:
    """Decode the reference with an fp32 copy of a half-precision VAE on the CPU.

    PyTorch's CPU convolutions in fp16/bf16 run about 200x slower than in fp32 (0.3 against 74
    GFLOP/s measured on a 2-core EPYC): one 256 px decode of the SD VAE took over 15 minutes.  The
    VAE is small (under 0.2 B parameters), so a temporary fp32 copy costs little memory; the
    decoder graph is then checked against fp32, within its dtype's tolerance.
    """
    vae = family.vae
    param = next(vae.parameters())
    if param.device.type != "cpu" or param.dtype == torch.float32:
        yield
        return
    family.vae = copy.deepcopy(vae).float()
    try:
        yield
    finally:
        family.vae = vae


def reference_run(family: Family, schedule: GuidanceSchedule, batch: int, *, seed: int = 0) -> Reference:
    """The PyTorch sampler on ``family`` (in its dtype) from seeded noise and the family's example conditioning."""
    noise = standard_normal(seed, family.sample_shape(batch))  # rstr's seeded noise, as `rstr-export run --seed`
    cond, uncond = example_inputs(family, batch, seed)
    trace: list[np.ndarray] = []
    to_t = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    latents = sample(
        family,
        schedule,
        to_t(cond),
        uncond=None if uncond is None else to_t(uncond),
        noise=torch.from_numpy(noise),
        callback=lambda s: trace.append(s.next_sample.cpu().numpy()),
    )
    final = latents.cpu().numpy()
    if not np.isfinite(final).all():
        raise RstrError(
            f"the {family.name} model gives non-finite latents in {family.dtype} (overflow); build with --dtype fp32 or bf16"
        )
    images = None
    if family.vae is not None:
        with torch.no_grad(), _fp32_vae_on_cpu(family):
            images = family.decode(latents).cpu().numpy()
    classes = class_reference(family) if has_class_table(family) else None
    return Reference(noise, cond, uncond, final, trace, images, text_reference(family), classes)


def check_bundle(bundle: Bundle, ref: Reference, *, raise_on_failure: bool = True) -> Verification:
    """Run the bundle (ONNX Runtime, CPU) from the reference's noise and conditioning; compare."""
    trace: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="rstr-verify-") as tmp:
        from rstr.export.precision import cpu_checkable

        checked = cpu_checkable(bundle, Path(tmp))  # a bf16 graph runs emulated: ONNX Runtime CPU has no bf16 kernels
        with OnnxRuntimeRunner(checked, device="cpu", prepack=False) as runner:  # one run: no packed weight copies
            got = runner.infer(ref.noise, ref.cond, ref.uncond, trace=trace)
        backend = runner.backend + (" (bf16 emulated)" if checked is not bundle else "")
    per_step = [rel(x, y) for x, y in zip(trace, ref.trace)]
    graphs: dict[str, float] = {}
    decoder = bundle.decoder
    if decoder is not None and decoder.graph is not None and ref.images is not None:
        graphs[decoder.graph] = rel(run_graph(bundle, decoder.graph, {"latents": ref.latents})[0], ref.images)
    for name, (tokens, expected) in ref.text.items():
        graphs[name] = rel(run_graph(bundle, name, tokens)[0], expected)
    if ref.classes is not None and bundle.manifest.classes is not None:
        labels, rows = ref.classes
        got_rows = run_graph(bundle, bundle.manifest.classes.graph, labels)
        graphs[bundle.manifest.classes.graph] = max(rel(g, e) for g, e in zip(got_rows, rows))
    result = Verification(rel(got, ref.latents), tolerance(bundle), per_step, backend, graphs)
    if raise_on_failure and not result.passed:
        if result.max_rel_error <= result.tolerance:
            name, err = max(graphs.items(), key=lambda kv: kv[1])
            raise VerificationError(
                f"bundle graph {name} differs from PyTorch: max relative error {err:.2e} > {result.tolerance:.0e} "
                f"on the reference's inputs"
            )
        first = next((i for i, e in enumerate(per_step) if e > result.tolerance), len(per_step) - 1)
        steps = ", ".join(f"{i}:{e:.1e}" for i, e in enumerate(per_step))
        raise VerificationError(
            f"bundle differs from PyTorch: max relative error {result.max_rel_error:.2e} > "
            f"{result.tolerance:.0e}, first at step {first} (per step {steps})"
        )
    return result


def run_graph(bundle: Bundle, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One bundle graph on ONNX Runtime (CPU) on whole arrays; the session is closed on return."""
    session = open_session(bundle, graph, "cpu", prepack=False)
    return session.run(None, inputs)


def verify(
    bundle: Bundle, family: Family, schedule: GuidanceSchedule, *, seed: int = 0, raise_on_failure: bool = True
) -> Verification:
    """Run the bundle (ONNX Runtime, CPU) and the PyTorch sampler from the same noise; compare."""
    return check_bundle(bundle, reference_run(family, schedule, bundle.batch, seed=seed), raise_on_failure=raise_on_failure)
