"""Stage-1: evolutionary search for a sparse, variable-scale guidance schedule under a compute budget.

:func:`run_search` runs three phases, checkpointing after every batch of evaluations so that a
resumed run ends exactly where an uninterrupted one does:

1. **Baselines on search seeds.**  The simple schedules of the field -- constant CFG at every
   step count the budget allows, guidance on the first k steps ("Step AG"), guidance in an
   interval (Kynkaanniemi et al. 2024), conditional-only -- each at a few scales, scored on the
   search seeds.  The best of each kind (and of constant CFG at each step count) is what the
   result has to beat, so they are tuned exactly as hard as the search is: on the same seeds.
2. **Evolution** of a population seeded with those tuned baselines plus random members (see
   :class:`Genome`, :func:`mutate`, :func:`crossover`, :func:`repair`, :func:`next_generation`).
   The best few schedules (``finalists``) are re-scored on a second group of search-pool seeds
   and the result is the best on both groups: picking the best of many noisy scores favours
   lucky ones (the winner's curse), and an independent group halves that luck.
3. **Held-out scoring.**  The result and the selected baselines are re-scored, paired (same
   noise for every schedule), on held-out seed groups the search never saw.

Fitness is pluggable (:class:`Objective`): the digits Frechet distance with a class-accuracy
constraint for models that ship a digits classifier (the reference model), and fidelity to the
constant-CFG teacher's samples from the same noise for any other class-conditional model.
The compute budget is hard: :func:`repair` makes every candidate fit before it is scored.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from rstr._io import write_json
from rstr.errors import RstrError
from rstr.evaluate import HELD_OUT_SEEDS, SEARCH_SEEDS, SeedRange, evaluate, noise_for_seeds
from rstr.executor import Task, make_executor
from rstr.families.base import Family
from rstr.families.ddim import supports_own_timesteps
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

CHECKPOINT_FORMAT = "rstr.search-checkpoint/1"
REPORT_FORMAT = "rstr.search-report/1"
QUANTUM = 0.05  # scales live on a 0.05 grid: readable schedules, and equal phenotypes share one cache entry
START_QUANTUM = 0.01  # the first timestep, as a fraction of the training timesteps, on a 0.01 grid
MIN_STEPS = 2  # the DDIM/Euler samplers need at least two steps

Metrics = dict[str, list[float]]  # metric name -> one value per seed group


# ================================================================================= genome
@dataclass(frozen=True)
class Genome:
    """One candidate: per step a guided flag and a scale in ``[0, w_max]``; its length is the step count.

    The scale of an *unguided* step is kept as a latent gene, so that a later flip back to
    guided restores it instead of inventing a scale.  Two genomes that differ only in latent
    genes are the same schedule (:attr:`key`) and share one fitness.

    ``warp`` = ``(start, rho)`` places the steps in time (:meth:`timesteps`): the first timestep
    at ``start`` of the training range, the others at ``start * (1 - i / (n - 1)) ** rho`` of it
    down to 0 (``rho > 1`` spends more steps at low noise).  ``None`` keeps the sampler's stock
    spacing -- what every baseline uses.  Two genes instead of one per step: the grid stays
    smooth, moves with the step count, and the search cannot overfit the noise of one seed group
    with a jagged grid (AutoDiffusion searches timesteps freely; we found a smooth warp enough).
    """

    guided: tuple[bool, ...]
    scales: tuple[float, ...]
    warp: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.guided) != len(self.scales):
            raise ValueError(f"genome has {len(self.guided)} flags but {len(self.scales)} scales")

    @property
    def num_steps(self) -> int:
        return len(self.guided)

    @property
    def passes(self) -> int:
        """Transformer passes per image: two per guided step, one per unguided step."""
        return self.num_steps + sum(self.guided)

    @property
    def key(self) -> str:
        """The schedule this genome denotes (latent genes dropped): ``"1.50,-,2.00"``, plus ``"@0.92^1.30"`` with own timesteps."""
        steps = ",".join(f"{s:.2f}" if g else "-" for g, s in zip(self.guided, self.scales))
        return steps if self.warp is None else f"{steps}@{self.warp[0]:.2f}^{self.warp[1]:.2f}"

    @classmethod
    def from_key(cls, key: str) -> "Genome":
        steps, _, warp = key.partition("@")
        parts = steps.split(",")
        start, _, rho = warp.partition("^")
        return cls(tuple(p != "-" for p in parts), tuple(1.0 if p == "-" else float(p) for p in parts),
                   (float(start), float(rho)) if warp else None)

    @classmethod
    def span(cls, num_steps: int, start: int, stop: int, scale: float) -> "Genome":
        """Guidance at ``scale`` on steps ``start <= i < stop`` (constant, first-k, interval, none)."""
        return cls(tuple(start <= i < stop for i in range(num_steps)), (quantize(scale),) * num_steps)

    def with_warp(self, warp: tuple[float, float] | None) -> "Genome":
        return Genome(self.guided, self.scales, warp)

    def timesteps(self, num_train: int) -> tuple[int, ...] | None:
        """The scheduler timesteps of the ``warp`` genes (strictly decreasing, last 0), or None for the stock spacing."""
        if self.warp is None:
            return None
        start, rho = self.warp
        n, first = self.num_steps, min(num_train - 1, round(start * num_train))
        ts = [round(first * (1 - i / (n - 1)) ** rho) for i in range(n)] if n > 1 else [first]
        for i in range(n - 2, -1, -1):  # rounding may tie neighbours at low noise: keep them distinct
            ts[i] = max(ts[i], ts[i + 1] + 1)
        return tuple(ts)

    def schedule(self, family: str, sampler: str, default_steps: int, num_train: int = 1000) -> GuidanceSchedule:
        return GuidanceSchedule(
            family=family,
            sampler=sampler,
            guided=self.guided,
            scales=tuple(s if g else None for g, s in zip(self.guided, self.scales)),
            default_steps=default_steps,
            timesteps=self.timesteps(num_train),
        )

    def to_json(self) -> dict[str, Any]:
        return {"guided": list(self.guided), "scales": list(self.scales), "warp": None if self.warp is None else list(self.warp)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Genome":
        warp = data.get("warp")
        return cls(tuple(bool(g) for g in data["guided"]), tuple(float(s) for s in data["scales"]),
                   None if warp is None else (float(warp[0]), float(warp[1])))


def quantize(scale: float, quantum: float = QUANTUM) -> float:
    return round(round(scale / quantum) * quantum, 2)


@dataclass(frozen=True)
class SearchSpace:
    """What a genome may be, and the scale units the operators work in.

    Step counts from ``step_counts``, at most ``max_passes`` passes per image, scales in
    ``[0, w_max]``; random members draw scales from ``init_scales``, mutation perturbs them
    with std ``sigma``.  With ``own_timesteps`` genomes may carry ``warp`` genes: ``start`` in
    ``start_range`` (perturbed with std ``start_sigma``), ``rho`` in ``rho_range`` (std
    ``rho_sigma``), over ``num_train`` training timesteps.
    """

    default_steps: int
    max_passes: int
    step_counts: tuple[int, ...]
    w_max: float = 4.0
    init_scales: tuple[float, float] = (1.0, 2.0)
    sigma: float = 0.3
    own_timesteps: bool = False
    num_train: int = 1000
    start_range: tuple[float, float] = (0.80, 0.99)
    rho_range: tuple[float, float] = (0.5, 2.0)
    start_sigma: float = 0.02
    rho_sigma: float = 0.1

    @classmethod
    def for_budget(cls, budget: float, default_steps: int, step_counts: Sequence[int], **genes: Any) -> "SearchSpace":
        """The space of schedules within ``budget`` (fraction of constant CFG at ``default_steps``)."""
        max_passes = math.floor(budget * 2 * default_steps + 1e-9)
        if max_passes < MIN_STEPS:
            raise RstrError(
                f"--budget {budget} allows {max_passes} transformer pass(es) per image; the sampler needs at least "
                f"{MIN_STEPS} steps, so use --budget {MIN_STEPS / (2 * default_steps):.2f} or more"
            )
        fitting = sorted({n for n in step_counts if MIN_STEPS <= n <= min(default_steps, max_passes)})
        return cls(default_steps, max_passes, tuple(fitting or [min(default_steps, max_passes)]), **genes)

    def max_guided(self, num_steps: int) -> int:
        return max(0, min(num_steps, self.max_passes - num_steps))

    def clip_warp(self, start: float, rho: float) -> tuple[float, float]:
        """``(start, rho)`` clipped to their ranges and snapped to their grids."""
        return (quantize(float(np.clip(start, *self.start_range)), START_QUANTUM),
                quantize(float(np.clip(rho, *self.rho_range))))


# ============================================================================== operators
def remap(genome: Genome, num_steps: int) -> Genome:
    """Resample the per-step genes to ``num_steps`` steps by relative position in the trajectory.

    New step ``i`` takes the genes of old step ``floor((i + 0.5) / num_steps * n_old)``: a gene
    that acted at 30% of the denoising keeps acting around 30%, whatever the step count.
    """
    n_old = genome.num_steps
    idx = [min(n_old - 1, int((i + 0.5) * n_old / num_steps)) for i in range(num_steps)]
    return Genome(tuple(genome.guided[j] for j in idx), tuple(genome.scales[j] for j in idx), genome.warp)


def repair(genome: Genome, space: SearchSpace) -> Genome:
    """Make ``genome`` fit the budget by un-guiding the guided steps whose scale is closest to 1.

    A guided step at ``w = 1`` computes exactly the unguided ``eps_c`` with an extra pass, so
    dropping the steps nearest ``w = 1`` (ties: the latest step first) changes the sampled
    trajectory least.  Deterministic: no random draw, so repair never shifts the RNG stream.
    """
    excess = genome.passes - space.max_passes
    if excess <= 0:
        return genome
    guided = list(genome.guided)
    order = sorted((i for i, g in enumerate(guided) if g), key=lambda i: (abs(genome.scales[i] - 1.0), -i))
    for i in order[:excess]:
        guided[i] = False
    return Genome(tuple(guided), genome.scales, genome.warp)


def random_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A random feasible member: random step count, ``k`` guided steps (``k`` uniform in what fits),
    scales uniform in ``space.init_scales`` (the range the baselines are tuned over: where useful
    scales are); mutation may take them anywhere in ``[0, w_max]``.  With ``own_timesteps``, half
    of them get ``warp`` genes uniform in their ranges.
    """
    n = int(rng.choice(space.step_counts))
    k = int(rng.integers(0, space.max_guided(n) + 1))
    chosen = set(rng.choice(n, size=k, replace=False).tolist())
    scales = tuple(quantize(s) for s in rng.uniform(*space.init_scales, size=n))
    warp = None
    if space.own_timesteps and rng.random() < 0.5:
        warp = space.clip_warp(rng.uniform(*space.start_range), rng.uniform(*space.rho_range))
    return Genome(tuple(i in chosen for i in range(n)), scales, warp)


def mutate(genome: Genome, space: SearchSpace, rng: np.random.Generator, *, p_steps: float, p_scale: float,
           p_warp: float = 0.0) -> Genome:
    """Mutate, then repair.

    * with probability ``p_steps`` move to another step count one or two places along
      ``space.step_counts`` from the nearest one, remapping the genes by relative position
      (:func:`remap`);
    * flip each guided flag with probability ``1 / num_steps`` (one flip per genome on average);
    * perturb each scale with probability ``p_scale`` by Gaussian noise of std ``space.sigma``,
      clipped to ``[0, w_max]`` and snapped to the 0.05 grid;
    * with ``space.own_timesteps``, with probability ``p_warp`` perturb the ``warp`` genes
      (a genome on the stock spacing first gets the warp nearest to it: ``start`` at
      ``(n - 1) / n``, where DDIM's leading spacing starts, and ``rho = 1``).
    """
    counts = space.step_counts
    if len(counts) > 1 and rng.random() < p_steps:
        i = min(range(len(counts)), key=lambda k: abs(counts[k] - genome.num_steps))  # a baseline may sit between counts
        j = int(np.clip(i + rng.choice([-2, -1, 1, 2]), 0, len(counts) - 1))
        if counts[j] == genome.num_steps:
            j = i + 1 if i + 1 < len(counts) else i - 1
        genome = remap(genome, counts[j])
    n = genome.num_steps
    flips = rng.random(n) < 1.0 / n
    moved = rng.random(n) < p_scale
    noise = rng.normal(0.0, space.sigma, size=n)
    guided = tuple(bool(g) ^ bool(f) for g, f in zip(genome.guided, flips))
    scales = tuple(
        quantize(float(np.clip(s + d, 0.0, space.w_max))) if m else s for s, d, m in zip(genome.scales, noise, moved)
    )
    warp = genome.warp
    if space.own_timesteps and rng.random() < p_warp:
        start, rho = warp if warp is not None else ((n - 1) / n, 1.0)
        warp = space.clip_warp(start + rng.normal(0.0, space.start_sigma), rho + rng.normal(0.0, space.rho_sigma))
    return repair(Genome(guided, scales, warp), space)


def crossover(a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
    """One-point crossover on relative time: the child keeps ``a``'s step count, takes ``a``'s genes
    before a random cut ``u`` in (0, 1) of the trajectory and ``b``'s (remapped) after it.

    Cutting in relative time keeps contiguous structure (a guided interval early, a scale ramp)
    intact, which uniform crossover would scatter.  The ``warp`` genes come from the parent
    that contributes more of the steps.  The child may exceed the budget: repair it.
    """
    u = rng.random()
    n = a.num_steps
    b = remap(b, n)
    take_a = [(i + 0.5) / n < u for i in range(n)]
    return Genome(
        tuple(ga if t else gb for t, ga, gb in zip(take_a, a.guided, b.guided)),
        tuple(sa if t else sb for t, sa, sb in zip(take_a, a.scales, b.scales)),
        a.warp if u >= 0.5 else b.warp,
    )


RankKey = tuple[float, float, int, str]


def tournament(population: list[Genome], rank: Callable[[Genome], RankKey], rng: np.random.Generator, size: int) -> Genome:
    """The best of ``size`` members drawn with replacement (lower rank key is better)."""
    picks = rng.integers(0, len(population), size=size)
    return min((population[int(i)] for i in picks), key=rank)


def next_generation(
    population: list[Genome], rank: Callable[[Genome], RankKey], space: SearchSpace, rng: np.random.Generator, config: "SearchConfig"
) -> list[Genome]:
    """Elitism, then tournament selection, crossover and mutation until the population is full.

    The ``elite`` best distinct schedules survive unchanged (the best never gets lost).  Each
    child comes from a tournament winner, crossed with a second winner with probability
    ``crossover``, then mutated and repaired.  A child that repeats a schedule already in the new
    population is redrawn (up to a limit), so the population does not collapse onto one point.
    """
    new: list[Genome] = []
    seen: set[str] = set()
    for g in sorted(population, key=rank):
        if len(new) < config.elite and g.key not in seen:
            new.append(g)
            seen.add(g.key)
    redraws = 0
    while len(new) < config.population:
        child = tournament(population, rank, rng, config.tournament)
        if rng.random() < config.crossover:
            child = crossover(child, tournament(population, rank, rng, config.tournament), rng)
        child = mutate(child, space, rng, p_steps=config.p_steps, p_scale=config.p_scale, p_warp=config.p_warp)
        if child.key in seen and redraws < 20 * config.population:
            redraws += 1
            continue
        new.append(child)
        seen.add(child.key)
    return new


# ============================================================================= objectives
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
    batch_size: int = 500
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
    result can approach but not beat the teacher.  Labels follow :func:`rstr.evaluate.evaluate`
    (image ``i`` of a group gets class ``i % num_classes``).
    """

    scale: float
    steps: int
    batch_size: int = 500
    name: ClassVar[str] = "teacher-fidelity"
    metric: ClassVar[str] = "teacher_mse"
    _teacher: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_teacher": {}}  # teacher samples are rebuilt in each worker

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "scale": self.scale, "steps": self.steps, "batch_size": self.batch_size}

    def _latents(self, family: Family, schedule: GuidanceSchedule, seeds: range) -> torch.Tensor:
        noise = noise_for_seeds(family, seeds)
        labels = torch.arange(len(seeds)) % family.num_classes  # type: ignore[attr-defined]
        outs = []
        with torch.inference_mode():
            for lo in range(0, len(seeds), self.batch_size):
                cond = {"class_labels": labels[lo : lo + self.batch_size].to(family.device)}
                outs.append(sample(family, schedule, cond, noise=noise[lo : lo + self.batch_size]).float().cpu())
        return torch.cat(outs)

    def measure(self, family: Family, schedule: GuidanceSchedule, *, seed_start: int, num: int, groups: int) -> Metrics:
        teacher_schedule = GuidanceSchedule.constant(
            self.scale, self.steps, family=family.name, sampler=family.sampler, default_steps=self.steps
        )
        mse = []
        for g in range(groups):
            seeds = range(seed_start + g * num, seed_start + (g + 1) * num)
            if (seeds.start, num) not in self._teacher:
                self._teacher[(seeds.start, num)] = self._latents(family, teacher_schedule, seeds)
            mse.append(float(((self._latents(family, schedule, seeds) - self._teacher[(seeds.start, num)]) ** 2).mean()))
        return {"teacher_mse": mse}


def default_scale(family: Family) -> float:
    """The model's constant CFG scale (``default_scale`` in its ``rstr.json``; 4.0, DiT's, otherwise)."""
    return float(family.meta.get("default_scale") or 4.0)


def objective_for(family: Family, config: "SearchConfig") -> Objective:
    """Digits FD for a model that ships a digits classifier, teacher fidelity for other class-conditional models."""
    if not hasattr(family, "num_classes"):
        raise RstrError(
            f"rstr search draws class labels for its seeds; {family.name} models take prompt embeddings, "
            "which the search cannot invent yet -- search a class-conditional (dit) model"
        )
    if family.meta.get("classifier"):
        return DigitsFD(min_accuracy=config.min_accuracy, batch_size=config.batch_size)
    return TeacherFidelity(scale=default_scale(family), steps=config.steps, batch_size=config.batch_size)


# ================================================================================= config
@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's result (saved in checkpoints and reports).

    ``budget``: passes per image as a fraction of constant CFG at ``steps`` steps;
    ``step_counts``: the step counts evolution may use; ``search_num`` images on search seeds
    per candidate; ``finalists``: how many of the best are re-scored on a second group of
    ``search_num`` search-pool seeds to pick the result; ``held_out_groups`` x ``held_out_num`` held-out images; ``baseline_scales``,
    ``partial_counts``, ``interval_starts``: the baseline grid (:func:`baseline_grid`);
    ``elite``, ``tournament``, ``crossover``, ``p_steps``, ``p_scale``, ``p_warp``: the evolution
    (:func:`next_generation`, :func:`mutate`); ``own_timesteps``: whether schedules may carry
    their own timesteps (``warp`` genes, where the sampler takes them); ``min_accuracy``: the
    digits constraint.

    Scales (``baseline_scales``, ``w_max``, ``sigma``) are multiples of the model's default CFG
    scale ``w0``, so one preset fits a model calibrated at 1.25 and one at 4 (:func:`space`).
    """

    budget: float
    steps: int
    preset: str
    seed: int
    population: int
    generations: int
    step_counts: tuple[int, ...]
    search_num: int
    held_out_num: int
    held_out_groups: int
    baseline_scales: tuple[float, ...]
    partial_counts: int
    interval_starts: tuple[float, ...]
    finalists: int
    w_max: float = 3.0
    elite: int = 2
    tournament: int = 3
    crossover: float = 0.7
    p_steps: float = 0.3
    p_scale: float = 0.3
    p_warp: float = 0.3
    own_timesteps: bool = True
    sigma: float = 0.2
    min_accuracy: float = 0.98
    batch_size: int = 500

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}



PRESETS: dict[str, dict[str, Any]] = {
    # ~2 minutes on two CPU cores (used by `rstr-export build`): a look, not a claim.
    "fast": dict(
        population=6, generations=2, step_fractions=(0.32, 0.4, 0.48), search_num=64, held_out_num=48, held_out_groups=2,
        baseline_scales=(1.0,), partial_counts=2, interval_starts=(0.5,), finalists=2,
    ),
    # the search the reports quote: 3 held-out groups of 2000 images.  Candidates are scored on
    # groups of 2000 too: the Frechet distance's finite-sample bias depends on the sample size and
    # on the samples' spread, so a smaller search group would rank schedules by another yardstick.
    # 2000, not 500: at 500 the paired noise (~0.1 FD on the reference model) is as large as the
    # differences between good schedules, so the search picked noise and the result tied the
    # best baseline on some held-out groups.  ~2 minutes on one GPU, hours on two CPU cores.
    "full": dict(
        population=10, generations=6, step_fractions=None, search_num=2000, held_out_num=2000, held_out_groups=3,
        baseline_scales=(1.0, 1.2, 1.6, 2.0), partial_counts=3, interval_starts=(1 / 3, 2 / 3), finalists=4,
    ),
}


def preset_config(preset: str, *, budget: float, steps: int, seed: int, images: int | None = None,
                  own_timesteps: bool = True) -> SearchConfig:
    """The configuration of ``preset`` for ``budget`` at ``steps`` full steps; checks every input.

    Step-count candidates are fractions of ``steps`` (``fast``: 8, 10, 12 of 25) or every count
    from 24% of ``steps`` up to ``steps`` (``full``); those the budget cannot pay for are dropped.
    ``images`` overrides the preset's images per candidate and per held-out group (one number for
    both: the Frechet distance's finite-sample bias depends on it).
    """
    if preset not in PRESETS:
        raise RstrError(f"--preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if not 0 < budget <= 1:
        raise RstrError(f"--budget {budget} must be in (0, 1]: the compute fraction of constant CFG at full steps")
    if steps < MIN_STEPS:
        raise RstrError(f"--steps {steps} is fewer than the {MIN_STEPS} steps the sampler supports; use --steps {MIN_STEPS} or more")
    p = dict(PRESETS[preset])
    if images is not None:
        if images < 2:
            raise RstrError(f"--images {images} is too few to score a schedule; use --images 500 or more for numbers to quote")
        p.update(search_num=images, held_out_num=images)
    fractions = p.pop("step_fractions")
    if fractions is None:
        counts = tuple(range(max(MIN_STEPS, round(0.24 * steps)), steps + 1))
    else:
        counts = tuple(sorted({max(MIN_STEPS, round(f * steps)) for f in fractions}))
    config = SearchConfig(budget=budget, steps=steps, preset=preset, seed=seed, step_counts=counts,
                          own_timesteps=own_timesteps, **p)
    space(config, 1.0)  # refuse a budget too small for any schedule now, not after loading the model
    return config


def space(config: SearchConfig, w0: float, scheduler: Any = None) -> SearchSpace:
    """The search space of ``config`` for a model whose default CFG scale is ``w0`` and whose sampler is
    ``scheduler``: ``warp`` genes only when the config allows them and the scheduler takes own timesteps."""
    lo, hi = min(config.baseline_scales), max(config.baseline_scales)
    own = config.own_timesteps and scheduler is not None and supports_own_timesteps(scheduler)
    num_train = int(scheduler.config.num_train_timesteps) if scheduler is not None else 1000
    return SearchSpace.for_budget(config.budget, config.steps, config.step_counts, w_max=config.w_max * w0,
                                  init_scales=(lo * w0, hi * w0), sigma=config.sigma * w0,
                                  own_timesteps=own, num_train=num_train)


# ============================================================================== baselines
@dataclass(frozen=True)
class Baseline:
    """A simple schedule to compare against; ``in_budget`` False marks references beyond the budget."""

    kind: str  # constant | first-k | interval | conditional-only
    genome: Genome
    in_budget: bool = True

    @property
    def label(self) -> str:
        g = self.genome
        n, idx = g.num_steps, [i for i, x in enumerate(g.guided) if x]
        if not idx:
            return f"conditional only, {n} steps"
        w = f"w={g.scales[idx[0]]:g}"
        if self.kind == "constant":
            return f"constant {w}, {n} steps"
        if self.kind == "first-k":
            return f"first {len(idx)} of {n} steps, {w}"
        return f"steps {idx[0]}-{idx[-1]} of {n}, {w}"


def baseline_grid(space: SearchSpace, config: "SearchConfig", w0: float) -> list[Baseline]:
    """The simple schedules tuned on search seeds, all within the budget unless marked.

    Scales are ``config.baseline_scales`` times the model's default scale ``w0``.

    * constant CFG at every step count ``n`` with ``2n`` passes in the budget, at each scale;
    * first-k and interval guidance that spend the whole budget: for ``config.partial_counts``
      step counts ``n`` spread between half the budget and the budget, ``k = max_passes - n``
      guided steps, first, or starting at each of ``config.interval_starts`` (fractions of the
      free room ``n - k``), at each scale;
    * conditional-only at the most steps the budget allows;
    * references beyond the budget: constant CFG (scale ``w0``) and conditional-only at full steps.
    """
    t, b = space.default_steps, space.max_passes
    scales = sorted({quantize(f * w0) for f in config.baseline_scales})
    out = [Baseline("constant", Genome.span(n, 0, n, w)) for n in range(MIN_STEPS, min(t, b // 2) + 1) for w in scales]
    lo, hi = b // 2 + 1, min(t, b - 1)
    partial = sorted({int(round(x)) for x in np.linspace(lo, hi, config.partial_counts)}) if lo <= hi else []
    for n in partial:
        k = b - n
        starts = sorted({int(round(f * (n - k))) for f in config.interval_starts} - {0})
        for w in scales:
            out.append(Baseline("first-k", Genome.span(n, 0, k, w)))
            out.extend(Baseline("interval", Genome.span(n, st, st + k, w)) for st in starts)
    out.append(Baseline("conditional-only", Genome.span(min(t, b), 0, 0, w0)))
    if 2 * t > b:
        out.append(Baseline("constant", Genome.span(t, 0, t, w0), in_budget=False))
    if t > b:
        out.append(Baseline("conditional-only", Genome.span(t, 0, 0, w0), in_budget=False))
    return out


# ================================================================================== state
class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the last checkpoint in ``checkpoint_dir`` is complete and resumable."""

    def __init__(self, checkpoint_dir: Path, generation: int, generations: int) -> None:
        done = "while scoring the baselines" if generation < 0 else f"after generation {generation} of {generations}"
        super().__init__(f"search interrupted {done}")
        self.checkpoint_dir, self.generation, self.generations = checkpoint_dir, generation, generations


@dataclass
class SearchState:
    """Everything a resumed search needs: it continues from here exactly as if never stopped."""

    generation: int  # -1 until the initial population has been scored
    population: list[Genome]
    rng: np.random.Generator
    search: dict[str, Metrics]  # fitness cache on search seeds, by schedule key
    validation: dict[str, Metrics]  # finalists on the second group of search-pool seeds
    held_out: dict[str, Metrics]  # scores on held-out seeds, by schedule key
    ga_keys: list[str]  # schedules the evolution itself scored, in order
    history: list[dict[str, Any]]

    @classmethod
    def fresh(cls, seed: int) -> "SearchState":
        return cls(-1, [], np.random.default_rng(seed), {}, {}, {}, [], [])

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "population": [g.to_json() for g in self.population],
            "rng": self.rng.bit_generator.state,
            "search": self.search,
            "validation": self.validation,
            "held_out": self.held_out,
            "ga_keys": self.ga_keys,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SearchState":
        rng = np.random.default_rng()
        rng.bit_generator.state = data["rng"]
        return cls(
            data["generation"], [Genome.from_json(g) for g in data["population"]], rng,
            data["search"], data["validation"], data["held_out"], data["ga_keys"], data["history"],
        )


def model_identity(family: Family) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's path, family, size and sampler."""
    path = getattr(family, "path", None)
    return {
        "path": str(Path(path).resolve()) if path is not None else None,
        "family": family.name,
        "parameters": sum(p.numel() for p in family.transformer.parameters()),
        "sampler": family.sampler,
    }


CHECKPOINT_FILE = "checkpoint.json"


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``directory/checkpoint.json``; a missing or foreign file is one :class:`RstrError` line."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise RstrError(f"--resume {directory}: no {CHECKPOINT_FILE} there; give the checkpoint directory of an earlier `rstr search`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RstrError(f"--resume {directory}: {CHECKPOINT_FILE} is not readable JSON ({err}); start a new search") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise RstrError(f"--resume {directory}: not an rstr search checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return data


def check_resumable(data: dict[str, Any], directory: Path, model: dict[str, Any], config: SearchConfig, objective: Objective) -> None:
    """Refuse to resume a checkpoint made for another model, configuration or objective, naming the difference."""
    if data["model"] != model:
        raise RstrError(
            f"--resume {directory} was made for model {data['model'].get('path')} ({data['model'].get('family')}); "
            f"this run uses {model.get('path')}: pass the same --model or start a new search"
        )
    saved = data["config"]
    for k, v in config.to_json().items():
        if saved.get(k) != v:
            raise RstrError(f"--resume {directory} was made with {k}={saved.get(k)!r}, this run has {k}={v!r}: drop the option or start a new search")
    if data["objective"] != objective.describe():
        raise RstrError(f"--resume {directory} was scored with objective {data['objective']}, this run with {objective.describe()}; start a new search")


# ================================================================================ running
@dataclass
class EvalTask(Task):
    """Scores schedules on seed ranges with an :class:`Objective`; each worker loads the model once."""

    model: str | None
    objective: Objective
    family: Family | None = field(default=None, repr=False)  # preloaded, for inline runs only

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "family": None}  # workers load their own copy

    def setup(self, device: str) -> None:
        if self.family is None:
            from rstr.families import load_model

            if self.model is None:
                raise RstrError("this model was built in memory, so workers cannot load it; save it to a directory or use one worker")

            self.family = load_model(self.model, device=device)

    def run(self, item: tuple[GuidanceSchedule, int, int, int]) -> Metrics:
        schedule, seed_start, num, groups = item
        assert self.family is not None, "EvalTask.run before setup"
        return self.objective.measure(self.family, schedule, seed_start=seed_start, num=num, groups=groups)


@dataclass
class SearchResult:
    """The searched schedule and the report of how it compares (see :func:`write_outputs`)."""

    schedule: GuidanceSchedule
    report: dict[str, Any]


class _Search:
    """One run of the three phases; owns the state, the executor and checkpointing."""

    def __init__(self, family: Family, config: SearchConfig, checkpoint_dir: Path, objective: Objective, progress: bool,
                 on_checkpoint: Callable[[SearchState], None] | None) -> None:
        self.family, self.config, self.dir, self.objective = family, config, checkpoint_dir, objective
        self.space = space(config, default_scale(family), family.scheduler)
        self.progress, self.on_checkpoint = progress, on_checkpoint
        self.model = model_identity(family)
        self.state = SearchState.fresh(config.seed)
        self.executor = None
        self.search_seeds = SeedRange(SEARCH_SEEDS.start, SEARCH_SEEDS.start + config.search_num)
        self.validation_seeds = SeedRange(self.search_seeds.stop, self.search_seeds.stop + config.search_num)
        self.held_out_seeds = SeedRange(HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + config.held_out_num * config.held_out_groups)
        self.validation_seeds.require_within(SEARCH_SEEDS, "validation seeds")
        self.held_out_seeds.require_within(HELD_OUT_SEEDS, "held-out seeds")

    # ------------------------------------------------------------------- bookkeeping
    def schedule_of(self, g: Genome) -> GuidanceSchedule:
        return g.schedule(self.family.name, self.family.sampler, self.config.steps, self.space.num_train)

    def rank(self, g: Genome) -> RankKey:
        m = self.state.search[g.key]
        return (self.objective.violation(m), self.objective.value(m), g.passes, g.key)

    def best(self, keys: Sequence[str]) -> str | None:
        return min(keys, key=lambda k: self.rank(Genome.from_key(k)), default=None)

    def final_rank(self, key: str) -> RankKey:
        """A finalist's rank over both search-pool groups (search and validation)."""
        m = {k: v + self.state.validation[key][k] for k, v in self.state.search[key].items()}
        return (self.objective.violation(m), self.objective.value(m), Genome.from_key(key).passes, key)

    def save(self, out: Path | None) -> None:
        write_json(self.dir / CHECKPOINT_FILE, {
            "format": CHECKPOINT_FORMAT, "model": self.model, "config": self.config.to_json(),
            "objective": self.objective.describe(), "out": str(out.resolve()) if out else None, "state": self.state.to_json(),
        })
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state)

    def score(self, genomes: Sequence[Genome], which: str, desc: str) -> None:
        """Score the genomes not yet in the ``which`` cache (search, validation, held_out): same seeds for all."""
        cache: dict[str, Metrics] = getattr(self.state, which)
        todo = list({g.key: g for g in genomes if g.key not in cache}.values())
        if not todo:
            return
        seeds = {
            "search": (self.search_seeds.start, self.config.search_num, 1),
            "validation": (self.validation_seeds.start, self.config.search_num, 1),
            "held_out": (self.held_out_seeds.start, self.config.held_out_num, self.config.held_out_groups),
        }[which]
        items = [(self.schedule_of(g), *seeds) for g in todo]
        with tqdm(total=len(todo), desc=desc, disable=not self.progress, leave=False) as bar:
            for g, metrics in zip(todo, self.executor.map(items)):
                cache[g.key] = metrics
                bar.update()
                best = self.best([k for k in self.state.search if Genome.from_key(k).passes <= self.space.max_passes])
                if best is not None:
                    bar.set_postfix_str(f"best {self.objective.metric} {self.objective.value(self.state.search[best]):.4f}")

    # ------------------------------------------------------------------------ phases
    def run(self, out: Path | None, executor_factory: Callable[[Task], Any]) -> SearchResult:
        t0 = time.perf_counter()
        path = getattr(self.family, "path", None)
        task = EvalTask(str(Path(path).resolve()) if path is not None else None, self.objective, self.family)
        with executor_factory(task) as self.executor:
            grid = baseline_grid(self.space, self.config, default_scale(self.family))
            for lo in range(0, len(grid), self.config.population):
                self.score([b.genome for b in grid[lo : lo + self.config.population]], "search",
                           f"baselines {lo + 1}-{min(lo + self.config.population, len(grid))}/{len(grid)}")
                self.save(out)
            chosen = self.select_baselines(grid)
            self.evolve(chosen, out)
            finalists = sorted(self.state.ga_keys, key=lambda k: self.rank(Genome.from_key(k)))[: self.config.finalists]
            self.score([Genome.from_key(k) for k in finalists], "validation", "finalists")
            self.save(out)
            result = Genome.from_key(min(finalists, key=self.final_rank))
            self.score([result, *[b.genome for b in chosen]], "held_out", "held-out")
            self.save(out)
            ablations = self.ablations(result, chosen)
            self.score([g for _, g in ablations], "held_out", "ablations")
            self.save(out)
        schedule = self.schedule_of(result)
        return SearchResult(schedule, self.report(result, grid, chosen, ablations, time.perf_counter() - t0))

    def ablations(self, result: Genome, chosen: list[Baseline]) -> list[tuple[str, Genome]]:
        """Where a result with its own timesteps gains: its guidance on the stock timesteps, and the best
        in-budget baseline (on held-out seeds) on the result's timesteps.  None for a stock-spaced result."""
        if result.warp is None:
            return []
        metric = self.objective.metric
        best = min((b for b in chosen if b.in_budget), key=lambda b: statistics.fmean(self.state.held_out[b.genome.key][metric]))
        return [("search result on the stock timesteps", result.with_warp(None)),
                (f"{best.label} on the result's timesteps", best.genome.with_warp(result.warp))]

    def select_baselines(self, grid: list[Baseline]) -> list[Baseline]:
        """Best (on search seeds) constant CFG per step count, best first-k, best interval, and the fixed ones."""
        groups: dict[tuple[str, int | None, bool], list[Baseline]] = {}
        for b in grid:
            per_steps = b.genome.num_steps if b.kind == "constant" and b.in_budget else None
            groups.setdefault((b.kind, per_steps, b.in_budget), []).append(b)
        chosen = [min(bs, key=lambda b: self.rank(b.genome)) for bs in groups.values()]
        return sorted(chosen, key=lambda b: (b.genome.passes, b.kind))

    def initial_population(self, chosen: list[Baseline]) -> list[Genome]:
        """The best baseline of each kind, then the next best ones up to half the population; random members fill the rest."""
        ranked = sorted((b for b in chosen if b.in_budget), key=lambda b: self.rank(b.genome))
        kinds: dict[str, Genome] = {}
        for b in ranked:
            kinds.setdefault(b.kind, b.genome)
        seeds = list(kinds.values())
        for b in ranked:
            if len(seeds) < self.config.population // 2 and b.genome.key not in {g.key for g in seeds}:
                seeds.append(b.genome)
        while len(seeds) < self.config.population:
            g = random_genome(self.space, self.state.rng)
            if g.key not in {s.key for s in seeds}:
                seeds.append(g)
        return seeds

    def evolve(self, chosen: list[Baseline], out: Path | None) -> None:
        st, cfg = self.state, self.config
        while st.generation < cfg.generations:
            if st.generation < 0:
                population = self.initial_population(chosen)
            else:
                population = next_generation(st.population, self.rank, self.space, st.rng, cfg)
            self.score(population, "search", f"generation {st.generation + 1}/{cfg.generations}")
            st.population = population
            st.generation += 1
            st.ga_keys.extend(k for k in dict.fromkeys(g.key for g in population) if k not in set(st.ga_keys))
            best = self.best(st.ga_keys)
            st.history.append({
                "generation": st.generation, "evaluated": len(st.search),
                "best": self.objective.value(st.search[best]), "best_schedule": best,
            })
            self.save(out)

    # ------------------------------------------------------------------------ report
    def entry(self, genome: Genome, **extra: Any) -> dict[str, Any]:
        s = self.schedule_of(genome)
        d: dict[str, Any] = {**extra, "describe": s.describe(), "schedule": genome.key, "passes_per_image": genome.passes,
                             "compute_fraction": s.compute_fraction, "timesteps": None if s.timesteps is None else list(s.timesteps)}
        for which, cache in (("search", self.state.search), ("validation", self.state.validation), ("held_out", self.state.held_out)):
            if genome.key in cache:
                m = cache[genome.key]
                d[which] = {"groups": m, "mean": {k: statistics.fmean(v) for k, v in m.items()},
                            "feasible": self.objective.violation(m) == 0}
        return d

    def report(self, result: Genome, grid: list[Baseline], chosen: list[Baseline], ablations: list[tuple[str, Genome]],
               seconds: float) -> dict[str, Any]:
        metric = self.objective.metric
        res = self.entry(result, label="search result")
        held = res["held_out"]["groups"][metric]
        baselines = []
        for b in chosen:
            e = self.entry(b.genome, kind=b.kind, label=b.label, in_budget=b.in_budget)
            theirs = e["held_out"]["groups"][metric]
            e["result_better_on_all_groups"] = all(a < t for a, t in zip(held, theirs))
            baselines.append(e)
        front = pareto_front([(Genome.from_key(k), self.state.search[k]) for k in self.state.ga_keys], self.objective)
        bfront = pareto_front([(b.genome, self.state.search[b.genome.key]) for b in grid if b.in_budget], self.objective)
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "config": self.config.to_json(),
            "objective": self.objective.describe(),
            "seeds": {"search": [self.search_seeds.start, self.search_seeds.stop],
                      "validation": [self.validation_seeds.start, self.validation_seeds.stop],
                      "held_out": [self.held_out_seeds.start, self.held_out_seeds.stop],
                      "held_out_groups": self.config.held_out_groups, "held_out_num": self.config.held_out_num},
            "budget": {"compute_fraction": self.config.budget, "max_passes_per_image": self.space.max_passes,
                       "full_cfg_passes_per_image": 2 * self.config.steps},
            "result": res,
            "finalists": [self.entry(Genome.from_key(k)) for k in sorted(self.state.validation, key=self.final_rank)],
            "baselines": baselines,
            "beats_every_in_budget_baseline": all(b["result_better_on_all_groups"] for b in baselines if b["in_budget"]),
            "ablations": [self.entry(g, label=label) for label, g in ablations],
            "points": {
                "search": [[Genome.from_key(k).passes / (2 * self.config.steps), self.objective.value(self.state.search[k]),
                            self.objective.violation(self.state.search[k]) == 0] for k in self.state.ga_keys],
                "baselines": [[b.genome.passes / (2 * self.config.steps), self.objective.value(self.state.search[b.genome.key]), b.kind]
                              for b in grid],
            },
            "pareto_front": [self.entry(g) for g in front],
            "baseline_front": [self.entry(g) for g in bfront],
            "history": self.state.history,
            "evaluations": {"search_seeds": len(self.state.search), "validation": len(self.state.validation),
                            "held_out": len(self.state.held_out)},
            "seconds": round(seconds, 1),
        }


def pareto_front(points: Sequence[tuple[Genome, Metrics]], objective: Objective) -> list[Genome]:
    """Feasible schedules not beaten on both compute (passes) and quality by another one, by increasing compute."""
    unique = {g.key: (g, m) for g, m in points if objective.violation(m) == 0}
    feasible = sorted(((g.passes, objective.value(m), k) for k, (g, m) in unique.items()))
    front, best = [], math.inf
    for _, value, k in feasible:
        g = unique[k][0]
        if value < best:
            front.append(g)
            best = value
    return front


def run_search(
    family: Family,
    config: SearchConfig,
    checkpoint_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    workers: int = 1,
    backend: str = "local",
    device: str = "cpu",
    objective: Objective | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[SearchState], None] | None = None,
) -> SearchResult:
    """Search a schedule for ``family`` under ``config``, checkpointing into ``checkpoint_dir``.

    With ``resume`` the checkpoint there is continued (it must be for the same model and
    configuration); the result is then identical to an uninterrupted run's.  Local workers load the
    model on ``device`` (an inline run uses ``family`` where it is).  ``on_checkpoint``
    is called after every checkpoint write.  Ctrl-C raises :class:`SearchInterrupted`, leaving
    the last checkpoint in place.
    """
    directory = Path(checkpoint_dir)
    objective = objective if objective is not None else objective_for(family, config)
    run = _Search(family, config, directory, objective, progress, on_checkpoint)
    if resume:
        data = load_checkpoint(directory)
        check_resumable(data, directory, run.model, config, objective)
        run.state = SearchState.from_json(data["state"])
    try:
        return run.run(Path(out) if out else None, lambda task: make_executor(task, workers, backend, device))
    except KeyboardInterrupt:
        raise SearchInterrupted(directory, run.state.generation, config.generations) from None


# ================================================================================ outputs
def write_outputs(result: SearchResult, out: str | os.PathLike[str]) -> list[Path]:
    """Write the schedule to ``out`` and beside it ``search-report.json``, ``search-report.md`` and two PNGs."""
    from rstr.plots import plot_pareto, plot_schedule

    out = Path(out)
    result.schedule.save(out)
    paths = [out, out.with_name("search-report.json"), out.with_name("search-report.md"),
             out.with_name("search-schedule.png"), out.with_name("search-pareto.png")]
    write_json(paths[1], result.report)
    plot_schedule(result.schedule, paths[3])
    plot_pareto(result.report, paths[4])
    from rstr._io import atomic_path

    with atomic_path(paths[2]) as tmp:
        tmp.write_text(markdown_report(result.report, out.name, paths[3].name, paths[4].name))
    return paths


def markdown_report(r: dict[str, Any], schedule_name: str, schedule_png: str, pareto_png: str) -> str:
    """The human-readable report: result vs baselines on held-out seeds, then the Pareto fronts."""
    c, metric = r["config"], r["objective"]["metric"]
    groups = r["seeds"]["held_out_groups"]
    res = r["result"]
    has_acc = "accuracy" in res["held_out"]["mean"]

    def row(name: str, e: dict[str, Any], wins: str) -> str:
        h, s = e["held_out"], e["search"]
        per = " / ".join(f"{v:.4f}" for v in h["groups"][metric])
        cols = [name, str(e["passes_per_image"]), f"{e['compute_fraction']:.0%}", f"{s['mean'][metric]:.4f}", per, f"{h['mean'][metric]:.4f}"]
        cols += [f"{h['mean']['accuracy']:.3f}"] if has_acc else []
        return "| " + " | ".join([*cols, wins]) + " |"

    head = ["schedule", "passes/image", "compute", f"search {metric}", f"held-out {metric} per group", "held-out mean"]
    head += ["accuracy"] if has_acc else []
    head += ["wins"]
    lines = [
        f"# Stage-1 search: budget {c['budget']:.0%} of constant CFG at {c['steps']} steps",
        "",
        f"Model `{r['model']['path']}` ({r['model']['family']}, {r['model']['parameters']:,} parameters, {r['model']['sampler']}); "
        f"preset `{c['preset']}`, seed {c['seed']}; objective `{r['objective']['name']}` (lower {metric} is better"
        + (f", class accuracy >= {r['objective']['min_accuracy']}" if "min_accuracy" in r["objective"] else "") + ").",
        f"Search seeds {r['seeds']['search']} (one group of {c['search_num']} images), validation seeds {r['seeds']['validation']} "
        f"(the {c['finalists']} finalists only), held-out seeds {r['seeds']['held_out']} ({groups} groups of "
        f"{r['seeds']['held_out_num']} images, never seen by the search). Every schedule starts from the same noise.",
        f"Population {c['population']}, {c['generations']} generations, {r['evaluations']['search_seeds']} schedules scored "
        f"on search seeds, {r['seconds']:.0f} s (this run).",
        "",
        f"## Result: `{schedule_name}`",
        "",
        f"{res['describe']}; per step (`-` = unguided): `{res['schedule'].partition('@')[0]}`.",
        "",
        *([f"Its own timesteps (searched warp `@start^rho` = `{res['schedule'].partition('@')[2]}`; the baselines use the "
           f"sampler's stock spacing): `{res['timesteps']}`.", ""] if res.get("timesteps") else []),
        f"![schedule]({schedule_png})",
        "",
        f"Finalists, ranked by the mean over the search and validation groups ({metric}):",
        "",
        "| schedule | passes/image | search | validation |",
        "|---|---|---|---|",
        *[f"| `{e['schedule']}` | {e['passes_per_image']} | {e['search']['mean'][metric]:.4f} | {e['validation']['mean'][metric]:.4f} |"
          for e in r["finalists"]],
        "",
        "## Held-out comparison with the baselines",
        "",
        "Baselines were tuned on the search seeds (best scale, interval and k), then scored on the held-out groups. "
        "`wins` = the result is better on every held-out group.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        row("**search result**", res, ""),
    ]
    for b in r["baselines"]:
        note = "" if b["in_budget"] else " (over budget)"
        lines.append(row(b["label"] + note, b, "yes" if b["result_better_on_all_groups"] else "no"))
    verdict = "beats" if r["beats_every_in_budget_baseline"] else "does NOT beat"
    lines += [
        "",
        f"The result {verdict} every in-budget baseline on every held-out group.",
        "",
    ]
    if r.get("ablations"):
        lines += [
            "## Where the gain comes from",
            "",
            "The result's guidance on the stock timesteps, and the best baseline on the result's timesteps (held-out seeds):",
            "",
            "| schedule | passes/image | held-out " + metric + " per group | held-out mean | result better on every group |",
            "|---|---|---|---|---|",
        ]
        for e in r["ablations"]:
            theirs = e["held_out"]["groups"][metric]
            wins = all(a < t for a, t in zip(res["held_out"]["groups"][metric], theirs))
            lines.append(f"| {e['label']} | {e['passes_per_image']} | {' / '.join(f'{v:.4f}' for v in theirs)} | "
                         f"{e['held_out']['mean'][metric]:.4f} | {'yes' if wins else 'no'} |")
        lines.append("")
    lines += [
        "## Quality vs compute (search seeds)",
        "",
        f"![pareto]({pareto_png})",
        "",
        f"| compute | passes/image | search {metric} | schedule |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e['compute_fraction']:.0%} | {e['passes_per_image']} | {e['search']['mean'][metric]:.4f} | {e['describe']} |"
              for e in r["pareto_front"]]
    return "\n".join(lines) + "\n"
