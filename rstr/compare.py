"""Paired comparisons: the one way rstr says that one (model, schedule) is better than another.

Both sides are evaluated on the same seeds (identical noise and class per image), group by
group, by the model's quality measure (:func:`rstr.evaluate.evaluate`: digits FD and class
accuracy).  A comparison reports each side's per-group values, the per-group differences, and
a verdict in words:

* **better**: lower FD on every group, with class accuracy kept (>= the baseline's or 0.98);
* **worse**: higher FD on every group;
* **inside the noise**: anything else -- the groups disagree, so the difference is smaller
  than the spread between seed groups.

Build gates (schedule, adapter, precision) and every report row that compares against the
stock model use it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule

if TYPE_CHECKING:
    from rstr.engines.bundle import Bundle

Verdict = Literal["better", "worse", "inside the noise"]
MIN_ACCURACY = 0.98


@dataclass(frozen=True)
class Side:
    """One side of a comparison: what ran and its per-group scores."""

    label: str
    schedule: str
    passes_per_image: int
    compute_fraction: float
    fd: list[float]
    accuracy: list[float]

    @property
    def fd_mean(self) -> float:
        return sum(self.fd) / len(self.fd)

    @property
    def accuracy_mean(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)


@dataclass(frozen=True)
class Comparison:
    """``candidate`` against ``baseline`` on ``groups`` groups of ``num`` seeds from ``seed_start``, paired."""

    candidate: Side
    baseline: Side
    seed_start: int
    num: int
    groups: int

    @property
    def differences(self) -> list[float]:
        """Candidate FD minus baseline FD, per group (negative: the candidate is better)."""
        return [c - b for c, b in zip(self.candidate.fd, self.baseline.fd)]

    @property
    def keeps_accuracy(self) -> bool:
        return self.candidate.accuracy_mean >= min(MIN_ACCURACY, self.baseline.accuracy_mean)

    @property
    def verdict(self) -> Verdict:
        if all(d < 0 for d in self.differences) and self.keeps_accuracy:
            return "better"
        if all(d > 0 for d in self.differences):
            return "worse"
        return "inside the noise"

    @property
    def no_worse(self) -> bool:
        """FD no higher on any group and accuracy kept: what a build gate asks of a cheaper candidate."""
        return all(d <= 0 for d in self.differences) and self.keeps_accuracy

    def describe(self) -> str:
        """One line: both sides' per-group FD, the paired differences and the verdict."""
        fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        return (
            f"FD {fmt(self.candidate.fd)} ({self.candidate.label}) vs {fmt(self.baseline.fd)} ({self.baseline.label}); "
            f"paired differences {fmt(self.differences)} on {self.groups} x {self.num} seeds from {self.seed_start}: "
            f"{self.verdict}"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "differences": self.differences, "verdict": self.verdict, "no_worse": self.no_worse}

    @classmethod
    def from_json(cls, data: dict) -> Comparison:
        return cls(Side(**data["candidate"]), Side(**data["baseline"]), data["seed_start"], data["num"], data["groups"])


def score(family: Family, schedule: GuidanceSchedule, label: str, *, seed_start: int, num: int, groups: int) -> Side:
    """One side: ``schedule`` on ``family`` evaluated on the given seed groups."""
    from rstr.evaluate import evaluate

    r = evaluate(family, schedule, num=num, groups=groups, seed_start=seed_start, progress=False)
    return Side(
        label, schedule.describe(), schedule.passes_per_image, schedule.compute_fraction, list(r.fd), list(r.accuracy_per_group)
    )


def score_bundle(
    bundle: Bundle, family: Family, schedule: GuidanceSchedule, label: str, *, seed_start: int, num: int, groups: int
) -> Side:
    """One side: ``bundle`` (whose plan is ``schedule`` on ``family``) run on ONNX Runtime CPU, scored like :func:`score`.

    The same seeds, labels and scoring as the PyTorch side; only the latents come from the bundle,
    so a comparison of two bundles (or of a bundle with its PyTorch model) is paired.
    """
    import numpy as np
    import torch

    from rstr.engines.onnxruntime import OnnxRuntimeRunner
    from rstr.evaluate import evaluate

    runners: dict[int, OnnxRuntimeRunner] = {}

    def generate(cond, uncond, noise):
        n = len(noise)
        if n not in runners:
            runners[n] = OnnxRuntimeRunner(bundle.with_batch(n), device="cpu")
            runners[n].activate()
        cond_np = {k: v.cpu().numpy() for k, v in cond.items()}
        uncond_np = None if uncond is None else {k: v.cpu().numpy() for k, v in uncond.items()}
        return torch.from_numpy(runners[n].infer(np.ascontiguousarray(noise.cpu().numpy()), cond_np, uncond_np))

    try:
        r = evaluate(family, schedule, num=num, groups=groups, seed_start=seed_start, progress=False, generate=generate)
    finally:
        for runner in runners.values():
            runner.deactivate()
    return Side(
        label, schedule.describe(), schedule.passes_per_image, schedule.compute_fraction, list(r.fd), list(r.accuracy_per_group)
    )


def compare(
    candidate: tuple[Family, GuidanceSchedule, str],
    baseline: tuple[Family, GuidanceSchedule, str] | Side,
    *,
    seed_start: int,
    num: int,
    groups: int,
) -> Comparison:
    """Score both sides on the same seeds (a baseline already scored there may be passed as a :class:`Side`)."""
    scored = functools.partial(score, seed_start=seed_start, num=num, groups=groups)
    base = baseline if isinstance(baseline, Side) else scored(*baseline)
    return Comparison(scored(*candidate), base, seed_start, num, groups)
