"""The Stage-1 driver: baselines, evolution and held-out scoring, checkpointed after every batch of evaluations."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstr._io import write_json
from rstr._progress import progress_bar
from rstr.errors import RstrError
from rstr.executor import Executor, Task, make_executor
from rstr.families import dtype_name
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule
from rstr.search.baselines import Baseline, baseline_grid
from rstr.search.config import SearchConfig, space
from rstr.search.genome import Genome, RankKey, next_generation, random_genome
from rstr.search.objectives import Metrics, Objective, objective_for
from rstr.search.report import search_report
from rstr.search.state import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    SearchState,
    check_resumable,
    load_checkpoint,
    model_identity,
)
from rstr.seeds import HELD_OUT_SEEDS, SEARCH_SEEDS, SeedRange


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the last checkpoint in ``checkpoint_dir`` is complete and resumable."""

    def __init__(self, checkpoint_dir: Path, generation: int, generations: int) -> None:
        done = "while scoring the baselines" if generation < 0 else f"after generation {generation} of {generations}"
        super().__init__(f"search interrupted {done}")
        self.checkpoint_dir, self.generation, self.generations = checkpoint_dir, generation, generations


@dataclass
class EvalTask(Task):
    """Scores schedules on seed ranges with an :class:`Objective`; each worker loads the model once."""

    model: str | None
    objective: Objective
    prompts: str | None = None  # the prompt set the model's conditioning comes from, if any
    family: Family | None = field(default=None, repr=False)  # preloaded, for inline runs only
    dtype: str = "fp32"  # the dtype workers load the transformer in (the preloaded family's)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "family": None}  # workers load their own copy

    def setup(self, device: str) -> None:
        if self.family is None:
            from rstr.families import load_model

            if self.model is None:
                raise RstrError(
                    "this model was built in memory, so workers cannot load it; save it to a directory or use one worker"
                )

            self.family = load_model(self.model, device=device, dtype=self.dtype, prompts=self.prompts)

    def run(self, item: tuple[GuidanceSchedule, int, int, int]) -> Metrics:
        schedule, seed_start, num, groups = item
        assert self.family is not None, "EvalTask.run before setup"
        return self.objective.measure(self.family, schedule, seed_start=seed_start, num=num, groups=groups)


@dataclass
class SearchResult:
    """The searched schedule and the report of how it compares (see :func:`write_outputs`)."""

    schedule: GuidanceSchedule
    report: dict[str, Any]
    candidates: list[GuidanceSchedule]  # the result, the other finalists, then the in-budget baselines, best first


class _Search:
    """One run of the three phases; owns the state, the executor and checkpointing."""

    def __init__(
        self,
        family: Family,
        config: SearchConfig,
        checkpoint_dir: Path,
        objective: Objective,
        progress: bool,
        on_checkpoint: Callable[[SearchState], None] | None,
    ) -> None:
        self.family, self.config, self.dir, self.objective = family, config, checkpoint_dir, objective
        stock = GuidanceSchedule.conditional_only(config.steps, family=family.name, sampler=family.sampler)
        self.space = space(config, family.default_scale, family.scheduler_for(stock))
        self.progress, self.on_checkpoint = progress, on_checkpoint
        self.model = model_identity(family)
        self.state = SearchState.fresh(config.seed)
        self.executor: Executor | None = None  # open while run() runs
        self.search_seeds = SeedRange(SEARCH_SEEDS.start, SEARCH_SEEDS.start + config.search_num)
        self.validation_seeds = SeedRange(self.search_seeds.stop, self.search_seeds.stop + config.search_num)
        self.held_out_seeds = SeedRange(HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + config.held_out_num * config.held_out_groups)
        self.validation_seeds.require_within(SEARCH_SEEDS, "validation seeds")
        self.held_out_seeds.require_within(HELD_OUT_SEEDS, "held-out seeds")

    # ------------------------------------------------------------------- bookkeeping
    def schedule_of(self, g: Genome) -> GuidanceSchedule:
        return g.schedule(self.family.name, self.family.sampler, self.config.steps, self.space.num_train, self.space.last_at_zero)

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
        write_json(
            self.dir / CHECKPOINT_FILE,
            {
                "format": CHECKPOINT_FORMAT,
                "model": self.model,
                "config": self.config.to_json(),
                "objective": self.objective.describe(),
                "out": str(out.resolve()) if out else None,
                "state": self.state.to_json(),
            },
        )
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
        assert self.executor is not None, "score() runs inside run()"
        with progress_bar(len(todo), desc, enabled=self.progress) as bar:
            for g, metrics in zip(todo, self.executor.map(items)):
                cache[g.key] = metrics
                bar.advance()
                best = self.best([k for k in self.state.search if Genome.from_key(k).passes <= self.space.max_passes])
                if best is not None:
                    bar.note(f"best {self.objective.metric} {self.objective.value(self.state.search[best]):.4f}")

    # ------------------------------------------------------------------------ phases
    def run(self, out: Path | None, executor_factory: Callable[[Task], Executor]) -> SearchResult:
        t0 = time.perf_counter()
        f = self.family
        task = EvalTask(
            str(f.path) if f.path is not None else None,
            self.objective,
            str(f.prompts) if f.prompts else None,
            f,
            dtype_name(f.dtype),
        )
        with executor_factory(task) as self.executor:
            grid = baseline_grid(self.space, self.config, self.family.default_scale)
            for lo in range(0, len(grid), self.config.population):
                self.score(
                    [b.genome for b in grid[lo : lo + self.config.population]],
                    "search",
                    f"baselines {lo + 1}-{min(lo + self.config.population, len(grid))}/{len(grid)}",
                )
                self.save(out)
            chosen = self.select_baselines(grid)
            self.evolve(chosen, out)
            finalists = sorted(self.state.ga_keys, key=lambda k: self.rank(Genome.from_key(k)))[: self.config.finalists]
            # the best baseline of each kind competes too, on the stock timesteps and on the best evolved
            # schedule's: the result is never a schedule that a simple one beats on the search pool (search +
            # validation seeds), on either grid
            kinds = self.best_of_each_kind(chosen, lambda b: self.rank(b.genome))
            regridded = self.regridded(Genome.from_key(finalists[0]), kinds)
            self.score([g for _, g in regridded], "search", "baselines on the searched timesteps")
            finalists = list(dict.fromkeys([*finalists, *(b.genome.key for b in kinds), *(g.key for _, g in regridded)]))
            self.score([Genome.from_key(k) for k in finalists], "validation", "finalists")
            self.save(out)
            result = Genome.from_key(min(finalists, key=self.final_rank))
            self.score([result, *[b.genome for b in chosen]], "held_out", "held-out")
            self.save(out)
            ablations = self.ablations(result, chosen)
            self.score([g for _, g in ablations], "held_out", "ablations")
            self.save(out)
        ranked = [
            result,
            *(Genome.from_key(k) for k in sorted(self.state.validation, key=self.final_rank)),
            *(b.genome for b in sorted((b for b in chosen if b.in_budget), key=lambda b: self.rank(b.genome))),
        ]
        candidates = [self.schedule_of(g) for g in {g.key: g for g in ranked}.values()]
        report = search_report(self, result, grid, chosen, regridded, ablations, time.perf_counter() - t0)
        return SearchResult(candidates[0], report, candidates)

    def regridded(self, best: Genome, kinds: list[Baseline]) -> list[tuple[str, Genome]]:
        """The baselines ``kinds`` moved onto the timesteps of ``best`` (the best evolved schedule), labelled;
        none when ``best`` keeps the stock spacing."""
        if best.warp is None:
            return []
        return [(f"{b.label} on the searched timesteps", b.genome.with_warp(best.warp)) for b in kinds]

    def ablations(self, result: Genome, chosen: list[Baseline]) -> list[tuple[str, Genome]]:
        """Where a result with its own timesteps gains: its guidance on the stock timesteps, and the best
        in-budget baseline of every kind (on held-out seeds) moved onto the result's timesteps, so that no
        simple schedule wins by the grid alone.  None for a stock-spaced result."""
        if result.warp is None:
            return []
        metric = self.objective.metric
        best = self.best_of_each_kind(chosen, lambda b: statistics.fmean(self.state.held_out[b.genome.key][metric]))
        return [
            ("search result on the stock timesteps", result.with_warp(None)),
            *((f"{b.label} on the result's timesteps", b.genome.with_warp(result.warp)) for b in best),
        ]

    def best_of_each_kind(self, chosen: list[Baseline], key: Callable[[Baseline], Any]) -> list[Baseline]:
        """The best in-budget baseline of each kind, ``key`` ranking (lower is better)."""
        best: dict[str, Baseline] = {}
        for b in sorted((b for b in chosen if b.in_budget), key=key):
            best.setdefault(b.kind, b)
        return list(best.values())

    def select_baselines(self, grid: list[Baseline]) -> list[Baseline]:
        """Best (on search seeds) constant CFG per step count, best first-k, best interval, and the fixed ones."""
        groups: dict[tuple[str, int | None, bool], list[Baseline]] = {}
        for b in grid:
            per_steps = b.genome.num_steps if b.kind == "constant" and b.in_budget else None
            groups.setdefault((b.kind, per_steps, b.in_budget), []).append(b)
        chosen = [min(bs, key=lambda b: self.rank(b.genome)) for bs in groups.values()]
        return sorted(chosen, key=lambda b: (b.genome.passes, b.kind))

    def initial_population(self, chosen: list[Baseline]) -> list[Genome]:
        """The best baseline of each kind, then the next best ones up to half the population; the rest are random
        members or, with ``config.warp_seeds``, the best baselines (in rank order) on random timestep warps."""
        ranked = sorted((b for b in chosen if b.in_budget), key=lambda b: self.rank(b.genome))
        seeds = [b.genome for b in self.best_of_each_kind(chosen, lambda b: self.rank(b.genome))]
        for b in ranked:
            if len(seeds) < self.config.population // 2 and b.genome.key not in {g.key for g in seeds}:
                seeds.append(b.genome)
        warped = self.config.warp_seeds and self.space.own_timesteps
        i = 0
        while len(seeds) < self.config.population:
            if warped:
                rng, space = self.state.rng, self.space
                g = ranked[i % len(ranked)].genome.with_warp(
                    space.clip_warp(rng.uniform(*space.start_range), rng.uniform(*space.rho_range))
                )
                i += 1
            else:
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
            assert best is not None  # the population just scored is in ga_keys
            st.history.append(
                {
                    "generation": st.generation,
                    "evaluated": len(st.search),
                    "best": self.objective.value(st.search[best]),
                    "best_schedule": best,
                }
            )
            self.save(out)


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
