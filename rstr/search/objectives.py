"""What Stage-1 minimises: :class:`Objective` and its two measures, and which one a model gets."""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from rstr.errors import RstrError
from rstr.evaluate import eval_batch, evaluate, noise_for_seeds
from rstr.families.base import Family
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

if TYPE_CHECKING:
    from rstr.search.config import SearchConfig

Metrics = dict[str, list[float]]  # metric name -> one value per seed group


class Objective(ABC):
    """What the search minimises, measured on a seed range: one code path for every model.

    :meth:`measure` samples ``groups`` x ``num`` images from per-seed noise (identical for every
    schedule: comparisons are paired) and returns per-group values of named metrics; ``metric``
    names the quality number (lower is better) and :meth:`violation` how far a constraint is
    missed (0 when met).  Candidates rank by ``(violation, mean metric)``: a feasible candidate
    always beats an infeasible one, and among infeasible ones the smaller violation wins
    (Deb's feasibility rules -- no penalty weight to tune).  Subclasses are picklable
    dataclasses that build heavy state lazily, inside each worker.
    """

    name: ClassVar[str]
    metric: ClassVar[str]

    @abstractmethod
    def measure(self, family: Family, schedule: GuidanceSchedule, *, seed_start: int, num: int, groups: int) -> Metrics:
        """Per-group metrics of ``schedule`` on seeds ``[seed_start, seed_start + groups * num)``."""

    def violation(self, metrics: Metrics) -> float:
        return 0.0

    def value(self, metrics: Metrics) -> float:
        return statistics.fmean(metrics[self.metric])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class DigitsFD(Objective):
    """Frechet distance of the digits classifier's features to the real digits, with class accuracy >= ``min_accuracy``.

    The reference model's own quality measure (:func:`rstr.evaluate.evaluate`): the search then
    optimises what the held-out report shows, and may beat the full-CFG teacher, which teacher
    fidelity can never reward.  The accuracy constraint stops it from buying diversity (lower
    FD) with images of the wrong class.
    """

    min_accuracy: float = 0.98
    batch_size: int | None = None  # images per sampler call; None: the device's (rstr.evaluate.eval_batch)
    name: ClassVar[str] = "digits-fd"
    metric: ClassVar[str] = "fd"

    def measure(self, family: Family, schedule: GuidanceSchedule, *, seed_start: int, num: int, groups: int) -> Metrics:
        r = evaluate(family, schedule, num=num, groups=groups, seed_start=seed_start, batch_size=self.batch_size, progress=False)
        return {"fd": list(r.fd), "accuracy": list(r.accuracy_per_group)}

    def violation(self, metrics: Metrics) -> float:
        return max(0.0, self.min_accuracy - statistics.fmean(metrics["accuracy"]))


@dataclass
class TeacherFidelity(Objective):
    """Mean squared error between the final latents of the candidate and of the constant-CFG teacher
    (``scale`` at ``steps`` steps), from the same noise and labels.

    For models without a sample-quality metric here (no classifier, no real-data statistics):
    a paired, per-image measure that needs no feature network and has low variance, so small
    searches rank candidates reliably.  It rewards reproducing the full-compute samples, so the
    result can approach but not beat the teacher.  Conditioning follows :func:`rstr.evaluate.evaluate`
    (image ``i`` of a group gets class ``i % num_classes``, through the family's class table for
    text models).
    """

    scale: float
    steps: int
    batch_size: int | None = None  # images per sampler call; None: the device's (rstr.evaluate.eval_batch)
    name: ClassVar[str] = "teacher-fidelity"
    metric: ClassVar[str] = "teacher_mse"
    _teacher: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_teacher": {}}  # teacher samples are rebuilt in each worker

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "scale": self.scale, "steps": self.steps, "batch_size": self.batch_size}

    def _latents(self, family: Family, schedule: GuidanceSchedule, seeds: range) -> torch.Tensor:
        noise = noise_for_seeds(family, seeds)
        labels = torch.arange(len(seeds)) % (family.num_classes or 1)
        outs, n = [], self.batch_size or eval_batch(family.device)
        with torch.inference_mode():
            for lo in range(0, len(seeds), n):
                cond, uncond = family.conditioning_for(labels[lo : lo + n])
                outs.append(sample(family, schedule, cond, uncond=uncond, noise=noise[lo : lo + n]).float().cpu())
        return torch.cat(outs)

    def measure(self, family: Family, schedule: GuidanceSchedule, *, seed_start: int, num: int, groups: int) -> Metrics:
        teacher_schedule = family.constant_cfg(self.scale, self.steps, default_steps=self.steps)
        mse = []
        for g in range(groups):
            seeds = range(seed_start + g * num, seed_start + (g + 1) * num)
            if (seeds.start, num) not in self._teacher:
                self._teacher[(seeds.start, num)] = self._latents(family, teacher_schedule, seeds)
            mse.append(float(((self._latents(family, schedule, seeds) - self._teacher[(seeds.start, num)]) ** 2).mean()))
        return {"teacher_mse": mse}


def objective_for(family: Family, config: SearchConfig) -> Objective:
    """The family's quality measure: digits FD where it has the digits metrics, else fidelity to its constant-CFG teacher."""
    if family.num_classes is None:
        raise RstrError(
            f"this {family.name} model has neither class labels nor a prompt set to draw conditioning from; "
            "give prompts with --prompts FILE"
        )
    if family.quality == "digits":
        return DigitsFD(min_accuracy=config.min_accuracy, batch_size=config.batch_size)
    return TeacherFidelity(scale=family.default_scale, steps=config.steps, batch_size=config.batch_size)
