"""Stage-1 genomes and the evolution's operators: pure (numpy, no torch).

A :class:`Genome` is one candidate schedule, a :class:`SearchSpace` what a genome may be;
:func:`remap`, :func:`repair`, :func:`random_genome`, :func:`mutate`, :func:`crossover`,
:func:`tournament` and :func:`next_generation` make the next population.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rstr.errors import RstrError
from rstr.schedule import GuidanceSchedule

if TYPE_CHECKING:
    from rstr.search.config import SearchConfig

QUANTUM = 0.05  # scales live on a 0.05 grid: readable schedules, and equal phenotypes share one cache entry
START_QUANTUM = 0.01  # the first timestep, as a fraction of the training timesteps, on a 0.01 grid
MIN_STEPS = 2  # the DDIM/Euler samplers need at least two steps


@dataclass(frozen=True)
class Genome:
    """One candidate: per step a guided flag and a scale in ``[0, w_max]``; its length is the step count.

    The scale of an *unguided* step is kept as a latent gene, so that a later flip back to
    guided restores it instead of inventing a scale.  Two genomes that differ only in latent
    genes are the same schedule (:attr:`key`) and share one fitness.

    ``warp`` = ``(start, rho)`` places the steps in time (:meth:`timesteps`): the first timestep
    at ``start`` of the training range, the others at ``start * (1 - i / (n - 1)) ** rho`` of it
    down to 0 (``rho > 1`` spends more steps at low noise), or, where the sampler steps to 0
    after its last step (flow matching), at ``start * (1 - i / n) ** rho``.  ``None`` keeps the
    sampler's stock spacing -- what every baseline uses.  Two genes instead of one per step: the grid stays
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
    def from_key(cls, key: str) -> Genome:
        steps, _, warp = key.partition("@")
        parts = steps.split(",")
        start, _, rho = warp.partition("^")
        return cls(
            tuple(p != "-" for p in parts),
            tuple(1.0 if p == "-" else float(p) for p in parts),
            (float(start), float(rho)) if warp else None,
        )

    @classmethod
    def span(cls, num_steps: int, start: int, stop: int, scale: float) -> Genome:
        """Guidance at ``scale`` on steps ``start <= i < stop`` (constant, first-k, interval, none)."""
        return cls(tuple(start <= i < stop for i in range(num_steps)), (quantize(scale),) * num_steps)

    def with_warp(self, warp: tuple[float, float] | None) -> Genome:
        return Genome(self.guided, self.scales, warp)

    def timesteps(self, num_train: int, last_at_zero: bool = True) -> tuple[int, ...] | None:
        """The scheduler timesteps of the ``warp`` genes, strictly decreasing, or None for the stock spacing.

        ``last_at_zero``: the grid's last step is timestep 0 (DDIM); otherwise it is the last
        point above 0 of an ``n + 1``-point grid ending at 0, and the first may be ``num_train``
        (flow matching: sigma 1)."""
        if self.warp is None:
            return None
        start, rho = self.warp
        n = self.num_steps
        if last_at_zero:
            first = min(num_train - 1, round(start * num_train))
            ts = [round(first * (1 - i / (n - 1)) ** rho) for i in range(n)] if n > 1 else [first]
        else:
            first = min(num_train, round(start * num_train))
            ts = [round(first * (1 - i / n) ** rho) for i in range(n)]
            ts[-1] = max(ts[-1], 1)
        for i in range(n - 2, -1, -1):  # rounding may tie neighbours at low noise: keep them distinct
            ts[i] = max(ts[i], ts[i + 1] + 1)
        return tuple(ts)

    def schedule(
        self, family: str, sampler: str, default_steps: int, num_train: int = 1000, last_at_zero: bool = True
    ) -> GuidanceSchedule:
        return GuidanceSchedule(
            family=family,
            sampler=sampler,
            guided=self.guided,
            scales=tuple(s if g else None for g, s in zip(self.guided, self.scales)),
            default_steps=default_steps,
            timesteps=self.timesteps(num_train, last_at_zero),
        )

    def to_json(self) -> dict[str, Any]:
        return {"guided": list(self.guided), "scales": list(self.scales), "warp": None if self.warp is None else list(self.warp)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Genome:
        warp = data.get("warp")
        return cls(
            tuple(bool(g) for g in data["guided"]),
            tuple(float(s) for s in data["scales"]),
            None if warp is None else (float(warp[0]), float(warp[1])),
        )


def quantize(scale: float, quantum: float = QUANTUM) -> float:
    return round(round(scale / quantum) * quantum, 2)


@dataclass(frozen=True)
class SearchSpace:
    """What a genome may be, and the scale units the operators work in.

    Step counts from ``step_counts``, at most ``max_passes`` passes per image, scales in
    ``[0, w_max]``; random members draw scales from ``init_scales``, mutation perturbs them
    with std ``sigma``.  With ``own_timesteps`` genomes may carry ``warp`` genes: ``start`` in
    ``start_range`` (perturbed with std ``start_sigma``), ``rho`` in ``rho_range`` (std
    ``rho_sigma``), over ``num_train`` training timesteps, on a grid whose last step is at 0
    or not (``last_at_zero``, :meth:`Genome.timesteps`).  ``stock_warp`` is the warp nearest the
    sampler's stock spacing, where mutation starts a genome that has none; ``None``: DDIM's
    leading spacing, ``((n - 1) / n, 1)`` for ``n`` steps.
    """

    default_steps: int
    max_passes: int
    step_counts: tuple[int, ...]
    w_max: float = 4.0
    init_scales: tuple[float, float] = (1.0, 2.0)
    sigma: float = 0.3
    own_timesteps: bool = False
    num_train: int = 1000
    last_at_zero: bool = True
    stock_warp: tuple[float, float] | None = None
    start_range: tuple[float, float] = (0.80, 0.99)
    rho_range: tuple[float, float] = (0.5, 2.0)
    start_sigma: float = 0.02
    rho_sigma: float = 0.1

    @classmethod
    def for_budget(cls, budget: float, default_steps: int, step_counts: Sequence[int], **genes: Any) -> SearchSpace:
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
        return (quantize(float(np.clip(start, *self.start_range)), START_QUANTUM), quantize(float(np.clip(rho, *self.rho_range))))


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


def mutate(
    genome: Genome, space: SearchSpace, rng: np.random.Generator, *, p_steps: float, p_scale: float, p_warp: float = 0.0
) -> Genome:
    """Mutate, then repair.

    * with probability ``p_steps`` move to another step count one or two places along
      ``space.step_counts`` from the nearest one, remapping the genes by relative position
      (:func:`remap`);
    * flip each guided flag with probability ``1 / num_steps`` (one flip per genome on average);
    * perturb each scale with probability ``p_scale`` by Gaussian noise of std ``space.sigma``,
      clipped to ``[0, w_max]`` and snapped to the 0.05 grid;
    * with ``space.own_timesteps``, with probability ``p_warp`` perturb the ``warp`` genes
      (a genome on the stock spacing first gets the warp nearest to it, ``space.stock_warp``).
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
    scales = tuple(quantize(float(np.clip(s + d, 0.0, space.w_max))) if m else s for s, d, m in zip(genome.scales, noise, moved))
    warp = genome.warp
    if space.own_timesteps and rng.random() < p_warp:
        start, rho = warp if warp is not None else space.stock_warp or ((n - 1) / n, 1.0)
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
    population: list[Genome],
    rank: Callable[[Genome], RankKey],
    space: SearchSpace,
    rng: np.random.Generator,
    config: SearchConfig,
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
