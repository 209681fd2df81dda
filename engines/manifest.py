"""The bundle manifest, typed: what ``rstr-export build`` writes and every runtime reads.

Frozen dataclasses, each with ``to_json()`` and ``from_json()``, for every section of
``manifest.json`` (docs/bundle.md).  :meth:`Manifest.from_json` checks the format and version,
then validates the document against ``schemas/bundle.schema.json`` (the file the C++ runtime
embeds) before it reads any value, then the rules a schema cannot state
(:func:`rstr.engines.validate.document_problem`).  Every problem is one :class:`BundleError` line.

The plan's batch rule, *a guided step runs 2B denoiser rows ([cond; uncond]), an unguided step
B*, is written once, in :meth:`Plan.rows`.  The sections at the plan's two ends (decoder, text,
classes) are in :mod:`rstr.engines.endpoints`.  Torch-free, like all of ``rstr.engines``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from rstr.engines import schema
from rstr.engines.endpoints import Classes, Decoder, Text, omit_none
from rstr.engines.validate import document_problem

from rstr.errors import BundleError

FORMAT = "rstr.bundle"
VERSION = 1
DTYPES = {"float32": np.float32, "int64": np.int64}
_MISSING = object()
REQUIRED = "required"  # conditioning.unconditional: the caller passes this input's unconditional rows


@dataclass(frozen=True)
class TensorDesc:
    """A graph input or output; ``"batch"`` (or another name) marks the symbolic batch axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def concrete(self, rows: int) -> tuple[int, ...]:
        """The shape with its symbolic axis 0 (``"batch"``, ``"batch2"``) resolved to ``rows``."""
        return tuple(rows if isinstance(d, str) else int(d) for d in self.shape)

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorDesc:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


def _descs(items) -> tuple[TensorDesc, ...]:
    return tuple(TensorDesc.from_json(d) for d in items)


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the bundle: its file and the tensors the plan walk binds."""

    file: str
    inputs: tuple[TensorDesc, ...]
    outputs: tuple[TensorDesc, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": [d.to_json() for d in self.inputs], "outputs": [d.to_json() for d in self.outputs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Graph:
        return cls(d["file"], _descs(d["inputs"]), _descs(d["outputs"]))


@dataclass(frozen=True)
class Conditioning:
    """The conditioning inputs; per input its unconditional rows: a fill value, or :data:`REQUIRED` from the caller."""

    inputs: tuple[TensorDesc, ...]
    unconditional: Mapping[str, float | str]
    num_classes: int | None = None

    def to_json(self) -> dict[str, Any]:
        rules = {k: v if v == REQUIRED else {"fill": v} for k, v in self.unconditional.items()}
        return omit_none({"inputs": [d.to_json() for d in self.inputs], "unconditional": rules, "num_classes": self.num_classes})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Conditioning:
        rules = {k: v if v == REQUIRED else v["fill"] for k, v in d["unconditional"].items()}
        return cls(_descs(d["inputs"]), rules, d.get("num_classes"))


def _coefs(value: float | list[float]) -> tuple[float, ...]:
    """A plan coefficient as written: one number, or ``[current, previous, ...]``."""
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass(frozen=True)
class Step:
    """One denoising step: the scheduler timestep, the value the model receives, guidance, and
    the scheduler update, linear in the current sample and model output and the last ``k``:
    ``x_next = coef_sample * x + coef_eps * eps + sum_d past_sample[d] * x_{i-1-d} + past_eps[d] * eps_{i-1-d}``.
    One-step schedulers (DDIM, flow-matching Euler) have no past terms; in JSON the coefficients
    are then plain numbers, else lists ``[current, previous, ...]``."""

    index: int
    timestep: float
    model_timestep: float
    guided: bool
    scale: float | None
    coef_sample: float
    coef_eps: float
    past_sample: tuple[float, ...] = ()
    past_eps: tuple[float, ...] = ()

    def coefficients(self, history: int) -> tuple[list[float], list[float]]:
        """Sample and model-output coefficients ``[current, previous, ...]``, zero-padded to ``history + 1``."""
        pad = lambda cur, past: [cur, *past, *[0.0] * (history - len(past))]  # noqa: E731
        return pad(self.coef_sample, self.past_sample), pad(self.coef_eps, self.past_eps)

    def to_json(self, rows: int) -> dict[str, Any]:
        as_json = lambda cur, past: [cur, *past] if past else cur  # noqa: E731
        return {
            "index": self.index,
            "timestep": self.timestep,
            "model_timestep": self.model_timestep,
            "guided": self.guided,
            "scale": self.scale,
            "batch": rows,
            "coef_sample": as_json(self.coef_sample, self.past_sample),
            "coef_eps": as_json(self.coef_eps, self.past_eps),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Step:
        cs, ce = _coefs(d["coef_sample"]), _coefs(d["coef_eps"])
        return cls(d["index"], d["timestep"], d["model_timestep"], d["guided"], d["scale"], cs[0], ce[0], cs[1:], ce[1:])


@dataclass(frozen=True)
class Plan:
    """The static step plan at batch ``batch`` (B): every per-step constant a runtime needs."""

    batch: int
    init_noise_sigma: float
    default_steps: int
    passes_per_image: int  # transformer passes per image (the schedule's): 2 per guided step, 1 per unguided
    compute_fraction: float  # passes relative to constant CFG at default_steps
    sampler: str
    steps: tuple[Step, ...]

    def rows(self, guided: bool) -> int:
        """Denoiser rows of a step: 2B when guided (conditional rows, then unconditional), B when not."""
        return 2 * self.batch if guided else self.batch

    @property
    def denoiser_rows(self) -> list[int]:
        """The batches the denoiser runs at, ascending: B, 2B or both."""
        return sorted({self.rows(s.guided) for s in self.steps})

    @property
    def history(self) -> int:
        """Past (sample, model output) pairs the updates use: 0 for one-step schedulers, k for a k+1-step solver."""
        return max((max(len(s.past_sample), len(s.past_eps)) for s in self.steps), default=0)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_guided(self) -> int:
        return sum(s.guided for s in self.steps)

    def with_batch(self, batch: int) -> Plan:
        """The same steps at another batch (the step constants do not depend on it)."""
        if batch < 1:
            raise BundleError(f"batch {batch} must be at least 1")
        return replace(self, batch=batch)

    def to_json(self) -> dict[str, Any]:
        return {
            "init_noise_sigma": self.init_noise_sigma,
            "num_steps": self.num_steps,
            "default_steps": self.default_steps,
            "passes_per_image": self.passes_per_image,
            "compute_fraction": self.compute_fraction,
            "sampler": self.sampler,
            "steps": [s.to_json(self.rows(s.guided)) for s in self.steps],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], batch: int) -> Plan:
        """Build from the ``plan`` section of a valid manifest of batch ``batch`` (:meth:`Manifest.from_json` checks it)."""
        return cls(
            batch,
            d["init_noise_sigma"],
            d["default_steps"],
            d["passes_per_image"],
            d["compute_fraction"],
            d["sampler"],
            tuple(Step.from_json(s) for s in d["steps"]),
        )


@dataclass(frozen=True)
class Engine:
    """A TensorRT engine for one graph, built for one TensorRT release and GPU (engines/tensorrt)."""

    graph: str
    file: str
    backend: str = "tensorrt"
    tensorrt_version: str | None = None
    compute_capability: str | None = None
    device_name: str | None = None
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    builder_optimization_level: int | None = None
    profiles: tuple[Mapping[str, Any], ...] = ()  # [{"batch": N, "inputs": {name: {"min", "opt", "max"}}}]

    def to_json(self) -> dict[str, Any]:
        return omit_none(
            {
                "backend": self.backend,
                "graph": self.graph,
                "file": self.file,
                "tensorrt_version": self.tensorrt_version,
                "compute_capability": self.compute_capability,
                "device_name": self.device_name,
                "version_compatible": self.version_compatible,
                "hardware_compatibility": self.hardware_compatibility,
                "builder_optimization_level": self.builder_optimization_level,
                "profiles": list(self.profiles),
            }
        )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Engine:
        return cls(
            d["graph"],
            d["file"],
            d.get("backend", "tensorrt"),
            d.get("tensorrt_version"),
            d.get("compute_capability"),
            d.get("device_name"),
            bool(d.get("version_compatible", False)),
            d.get("hardware_compatibility") or "none",
            d.get("builder_optimization_level"),
            tuple(d.get("profiles", ())),
        )


@dataclass(frozen=True)
class Provenance:
    """Where the bundle came from; ``versions`` (rstr, torch, onnx, diffusers) sit beside the other fields in the JSON.

    Information, not instructions: ``rstr-export verify`` loads the model at ``model`` only when its
    files still hash to ``model_sha256``, and the adapter only from inside the bundle.
    """

    model: str
    schedule_sha256: str
    adapter: str | None = None
    adapter_sha256: str | None = None
    created: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    model_sha256: str | None = None
    size: Mapping[str, int] = field(default_factory=dict)  # the build's --height/--width/--max-text-len, when given

    _FIELDS = ("model", "model_sha256", "schedule_sha256", "adapter", "adapter_sha256", "created", "size")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.versions,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "schedule_sha256": self.schedule_sha256,
            "adapter": self.adapter,
            "adapter_sha256": self.adapter_sha256,
        }
        if self.size:
            out["size"] = dict(self.size)
        return {**out, "created": self.created} if self.created is not None else out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Provenance:
        return cls(
            model=d["model"],
            schedule_sha256=d["schedule_sha256"],
            adapter=d.get("adapter"),
            adapter_sha256=d.get("adapter_sha256"),
            created=d.get("created"),
            versions={k: v for k, v in d.items() if k not in cls._FIELDS},
            model_sha256=d.get("model_sha256"),
            size=d.get("size", {}),
        )


@dataclass(frozen=True)
class VerificationRecord:
    """The export's check of the bundle against PyTorch, from the same noise (rstr.export.verify)."""

    backend: str
    max_rel_error: float
    tolerance: float
    per_step_rel_error: tuple[float, ...] = ()
    graphs: Mapping[str, float] = field(default_factory=dict)  # other graphs (decoder, text encoders): max rel. error

    def to_json(self) -> dict[str, Any]:
        out = {
            "backend": self.backend,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "per_step_rel_error": list(self.per_step_rel_error),
        }
        return {**out, "graphs": dict(self.graphs)} if self.graphs else out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VerificationRecord:
        return cls(
            d["backend"], d["max_rel_error"], d["tolerance"], tuple(d.get("per_step_rel_error", ())), dict(d.get("graphs", {}))
        )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return omit_none({"sha256": self.sha256, "bytes": self.bytes})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FileEntry:
        return cls(d["sha256"], d.get("bytes"))


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: the graphs, the plan at batch B and everything needed to run and trust them."""

    family: str
    dtype: str
    sample: TensorDesc  # [B, ...], concrete
    graphs: Mapping[str, Graph]
    conditioning: Conditioning
    plan: Plan
    provenance: Provenance
    decoder: Decoder | None = None
    text: Text | None = None
    classes: Classes | None = None
    engines: tuple[Engine, ...] = ()
    verification: VerificationRecord | None = None
    summary: Mapping[str, Any] | None = None  # the build's measurements, free-form (report.md)
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    precision: str = "fp32"  # the denoiser's block Linear layers after export: fp32, bf16, int8, int8-dynamic

    @property
    def batch(self) -> int:
        return self.plan.batch

    def with_batch(self, batch: int) -> Manifest:
        """The plan and declared shapes at another batch; the graphs (batch axis dynamic) are the same files."""
        sample = replace(self.sample, shape=(batch, *self.sample.shape[1:]))
        return replace(self, plan=self.plan.with_batch(batch), sample=sample)

    def engines_for(self, backend: str) -> list[Engine]:
        return [e for e in self.engines if e.backend == backend]

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "version": VERSION,
            "family": self.family,
            "batch": self.batch,
            "dtype": self.dtype,
            "precision": self.precision,
            "sample": self.sample.to_json(),
            "graphs": {k: g.to_json() for k, g in self.graphs.items()},
            "conditioning": self.conditioning.to_json(),
            "plan": self.plan.to_json(),
            "decoder": None if self.decoder is None else self.decoder.to_json(),
            **({"text": self.text.to_json()} if self.text is not None else {}),
            **({"classes": self.classes.to_json()} if self.classes is not None else {}),
            "engines": [e.to_json() for e in self.engines],
            "provenance": self.provenance.to_json(),
        }
        if self.verification is not None:
            out["verification"] = self.verification.to_json()
        if self.summary is not None:
            out["summary"] = dict(self.summary)
        out["files"] = {k: f.to_json() for k, f in self.files.items()}
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "manifest.json") -> Manifest:
        """Check format and version, validate against the bundle schema, then read; one BundleError line on any problem."""
        if not isinstance(data, dict):
            raise BundleError(f"{source} must hold a JSON object (got {schema.json_type(data)})")
        for key, want in (("format", FORMAT), ("version", VERSION)):
            value = data.get(key, _MISSING)
            if value is _MISSING:
                raise BundleError(f"{source}: {key} is missing; this is not an rstr bundle")
            if isinstance(value, bool) or value != want or type(value) is not type(want):
                if key == "format":
                    raise BundleError(f'{source}: format is {schema.dump(value)}, not "{FORMAT}": this is not an rstr bundle')
                raise BundleError(
                    f"{source}: version is {schema.dump(value)}; this runtime reads version {VERSION} (rebuild the bundle "
                    "with a matching rstr-export, or use a matching runtime)"
                )
        problem = schema.check(data, "bundle") or document_problem(data)
        if problem is not None:
            raise BundleError(f"{source}: {problem}")
        batch = data["batch"]
        decoder, verification = data.get("decoder"), data.get("verification")
        text, classes = data.get("text"), data.get("classes")
        return cls(
            family=data["family"],
            dtype=data["dtype"],
            precision=data.get("precision", "fp32"),
            sample=TensorDesc.from_json(data["sample"]),
            graphs={k: Graph.from_json(g) for k, g in data["graphs"].items()},
            conditioning=Conditioning.from_json(data["conditioning"]),
            plan=Plan.from_json(data["plan"], batch),
            provenance=Provenance.from_json(data["provenance"]),
            decoder=None if decoder is None else Decoder.from_json(decoder),
            text=None if text is None else Text.from_json(text),
            classes=None if classes is None else Classes.from_json(classes),
            engines=tuple(Engine.from_json(e) for e in data.get("engines", ())),
            verification=None if verification is None else VerificationRecord.from_json(verification),
            summary=data.get("summary"),
            files={k: FileEntry.from_json(f) for k, f in data["files"].items()},
        )
