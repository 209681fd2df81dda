"""Guidance schedules: which denoising steps run classifier-free guidance, and at what scale.

Convention (used everywhere in rstr, from the sampler to the compiled step plan):

* a **guided** step runs two transformer passes (batch 2B: conditional rows first, then
  unconditional) and combines them as ``eps = eps_u + w_t * (eps_c - eps_u)``;
* an **unguided** step runs ONE pass (batch B) on the conditional input and uses
  ``eps = eps_c`` -- numerically the same as ``w_t = 1`` without paying for ``eps_u``.

Reviews of OUSAC describe skipped steps as "``w_t`` set to 0, only the conditional pass
runs"; read literally, ``w_t = 0`` would give ``eps_u``.  rstr uses the convention above:
an unguided step is conditional-only, and a guided step may still use any ``w_t >= 0``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstr._io import read_json, write_json
from rstr.errors import ScheduleError

if TYPE_CHECKING:
    from rstr.engines.schema import Violation

FORMAT = "rstr.schedule/1"


@dataclass(frozen=True)
class GuidanceSchedule:
    """A per-step guidance plan for one model family and sampler.

    ``scales[i]`` is the CFG scale of step ``i`` when ``guided[i]``, else ``None``.
    ``num_steps`` may be smaller than ``default_steps`` (the model's usual step count,
    the reference for :attr:`compute_fraction`): the sampler then respaces its timesteps.
    ``timesteps``, when given, are the scheduler timesteps of the steps (strictly decreasing
    integers, e.g. found by Stage-1); ``None`` keeps the scheduler's own spacing for
    ``num_steps`` steps.
    """

    family: str
    sampler: str
    guided: tuple[bool, ...]
    scales: tuple[float | None, ...]
    default_steps: int
    timesteps: tuple[int, ...] | None = None
    num_steps: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "guided", tuple(bool(g) for g in self.guided))
        object.__setattr__(self, "scales", tuple(None if s is None else float(s) for s in self.scales))
        object.__setattr__(self, "num_steps", len(self.guided))
        if self.timesteps is not None:
            ts = tuple(self.timesteps)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ts):
                raise ScheduleError(f"timesteps {list(ts)} must be integers")
            object.__setattr__(self, "timesteps", ts)
            if len(ts) != self.num_steps:
                raise ScheduleError(f"schedule has {self.num_steps} steps but {len(ts)} timesteps; give one timestep per step")
            if ts[-1] < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ScheduleError(f"timesteps {list(ts)} must be strictly decreasing and >= 0")
        if self.num_steps < 1:
            raise ScheduleError("schedule has no steps; give at least one step")
        if len(self.scales) != self.num_steps:
            raise ScheduleError(f"schedule has {self.num_steps} guided flags but {len(self.scales)} scales")
        for i, (g, s) in enumerate(zip(self.guided, self.scales)):
            if g and (s is None or not math.isfinite(s) or s < 0):
                raise ScheduleError(f"step {i}: scale {s} must be a finite number >= 0 on a guided step")
            if not g and s is not None:
                raise ScheduleError(f"step {i}: an unguided step takes no scale (got {s}); drop it or mark the step guided")
        if self.default_steps < 1:
            raise ScheduleError(f"default_steps {self.default_steps} must be at least 1")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def constant(
        cls, scale: float, num_steps: int, *, family: str, sampler: str, default_steps: int | None = None
    ) -> GuidanceSchedule:
        """Classic CFG: every step guided at ``scale`` (two passes per step)."""
        return cls.interval(scale, num_steps, 0, num_steps, family=family, sampler=sampler, default_steps=default_steps)

    @classmethod
    def conditional_only(cls, num_steps: int, *, family: str, sampler: str, default_steps: int | None = None) -> GuidanceSchedule:
        """No guidance at all: one conditional pass per step."""
        return cls.interval(0.0, num_steps, 0, 0, family=family, sampler=sampler, default_steps=default_steps)

    @classmethod
    def interval(
        cls, scale: float, num_steps: int, start: int, stop: int, *, family: str, sampler: str, default_steps: int | None = None
    ) -> GuidanceSchedule:
        """Guidance only on steps ``start <= i < stop`` (Kynkaanniemi et al. 2024)."""
        if not 0 <= start <= stop <= num_steps:
            raise ScheduleError(f"interval [{start}, {stop}) does not fit in {num_steps} steps")
        guided = tuple(start <= i < stop for i in range(num_steps))
        return cls(
            family=family,
            sampler=sampler,
            guided=guided,
            scales=tuple(scale if g else None for g in guided),
            default_steps=default_steps or num_steps,
        )

    @classmethod
    def first_k(
        cls, scale: float, num_steps: int, k: int, *, family: str, sampler: str, default_steps: int | None = None
    ) -> GuidanceSchedule:
        """Guidance only on the first ``k`` steps ("Step AG")."""
        return cls.interval(scale, num_steps, 0, k, family=family, sampler=sampler, default_steps=default_steps)

    # ------------------------------------------------------------------- properties
    def scale_at(self, i: int) -> float:
        """The CFG scale of guided step ``i`` (an unguided step has none: a caller's fault)."""
        scale = self.scales[i]
        if scale is None:
            raise ValueError(f"step {i} is not guided and has no scale")
        return scale

    @property
    def num_guided(self) -> int:
        return sum(self.guided)

    @property
    def passes_per_image(self) -> int:
        """Transformer passes (forward rows) per image: 2 per guided step, 1 per unguided."""
        return self.num_steps + self.num_guided

    @property
    def compute_fraction(self) -> float:
        """Passes relative to constant CFG at ``default_steps`` (``2 * default_steps`` passes)."""
        return self.passes_per_image / (2 * self.default_steps)

    def describe(self) -> str:
        """One line for logs: steps, guided steps and compute (and the timesteps when they are the schedule's own)."""
        own = f", timesteps {self.timesteps[0]}..{self.timesteps[-1]}" if self.timesteps is not None else ""
        return (
            f"{self.num_steps} steps{own}, {self.num_guided} guided, {self.passes_per_image} passes/image, "
            f"{self.compute_fraction:.0%} of constant CFG at {self.default_steps} steps"
        )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "family": self.family,
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "default_steps": self.default_steps,
            "steps": [{"guided": True, "scale": s} if g else {"guided": False} for g, s in zip(self.guided, self.scales)],
        }
        if self.timesteps is not None:
            data["timesteps"] = list(self.timesteps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "schedule") -> GuidanceSchedule:
        """Check the format, validate against the ``rstr.schedule/1`` schema (rstr.engines' schemas/), then build;
        every problem is one :class:`ScheduleError` line naming the field."""
        from rstr.engines import schema

        if not isinstance(data, dict):
            raise ScheduleError(f"{source}: expected a JSON object, got {schema.json_type(data)}")
        if data.get("format") != FORMAT:
            raise ScheduleError(f"{source}: format {data.get('format')!r} is not {FORMAT!r}; write the file with rstr")
        problem = schema.check(data, "schedule")
        if problem is not None:
            raise ScheduleError(f"{source}: {_schema_message(problem, data)}")
        steps = data["steps"]
        if len(steps) != data["num_steps"]:
            raise ScheduleError(f"{source}: num_steps is {data['num_steps']} but 'steps' has {len(steps)} entries")
        guided = [step["guided"] for step in steps]
        scales = [step.get("scale") for step in steps]
        timesteps = data.get("timesteps")
        try:
            return cls(
                family=data["family"],
                sampler=data["sampler"],
                guided=tuple(guided),
                scales=tuple(scales),
                default_steps=int(data["default_steps"]),
                timesteps=None if timesteps is None else tuple(timesteps),
            )
        except ScheduleError as err:
            raise ScheduleError(f"{source}: {err}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GuidanceSchedule:
        path = Path(path)
        if not path.is_file():
            raise ScheduleError(f"schedule file {path} does not exist; write one with `rstr search --out {path}`")
        return cls.from_dict(read_json(path, ScheduleError), source=str(path))

    def sha256(self) -> str:
        """Content hash of the canonical JSON, for provenance."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def check_fits(self, family: str, sampler: str | None = None, num_train_timesteps: int | None = None) -> None:
        """Refuse a schedule written for another family (or sampler), or longer than the scheduler's training timesteps."""
        if self.family != family:
            raise ScheduleError(
                f"schedule is for family {self.family!r} but the model is {family!r}; search a schedule for this model"
            )
        if sampler is not None and self.sampler != sampler:
            raise ScheduleError(f"schedule is for sampler {self.sampler!r} but the model uses {sampler!r}")
        if num_train_timesteps is not None and self.num_steps > num_train_timesteps:
            raise ScheduleError(
                f"schedule has {self.num_steps} steps, more than the model's {num_train_timesteps} training timesteps; "
                "use fewer steps"
            )


def _schema_message(problem: Violation, data: dict[str, Any]) -> str:
    """A schema violation in the words rstr has always used for steps and timesteps, else the schema's own."""
    path = problem.path
    if len(path) == 2 and path[0] == "steps":
        return f"step {path[1]} must be {{'guided': bool, 'scale': float}}, got {data['steps'][path[1]]!r}"
    if path == ("timesteps",):
        return "'timesteps' must be a list of integers or null"
    if path[:1] == ("timesteps",):
        return f"timesteps {data['timesteps']} must be integers"
    return str(problem)
