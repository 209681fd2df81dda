"""Stage-1 configuration: :class:`SearchConfig`, the presets, and the search space a config gives a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rstr.errors import RstrError
from rstr.families.timesteps import last_step_at_zero, supports_own_timesteps
from rstr.search.genome import MIN_STEPS, SearchSpace


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
    constant_counts: int = 0  # constant-CFG baselines only at this many of the largest step counts that fit (0: every count)
    warp_seeds: bool = False  # fill the initial population with the best baselines on random warps, not random members
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
    batch_size: int | None = None  # images per sampler call; None: the device's (rstr.evaluate.eval_batch)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, dict[str, Any]] = {
    # The default build's search (`rstr-export build`), minutes on a CPU.  400 images per candidate:
    # with far fewer the Frechet distance is noise (docs/search/README.md, "Presets").
    # Step counts reach 80% of the full count (the full preset's 50% result has 20 of 25 steps);
    # constant CFG only at the two largest counts that fit; one held-out group (the build's own
    # gate and report compare against the stock model on their own seeds).
    "fast": dict(
        population=8,
        generations=2,
        step_fractions=(0.48, 0.64, 0.8),
        search_num=400,
        held_out_num=400,
        held_out_groups=1,
        baseline_scales=(1.0, 1.2),
        partial_counts=3,
        interval_starts=(0.5,),
        finalists=2,
        constant_counts=2,
        warp_seeds=True,
    ),
    # the search the reports quote: 3 held-out groups of 2000 images.  Candidates are scored on
    # groups of 2000 too: the Frechet distance's finite-sample bias depends on the sample size and
    # on the samples' spread, so a smaller search group would rank schedules by another yardstick.
    # 2000, not 500: at 500 the paired noise is as large as the differences between good schedules
    # (docs/search/README.md, "Presets").  Minutes on a GPU, hours on a CPU.
    "full": dict(
        population=10,
        generations=6,
        step_fractions=None,
        search_num=2000,
        held_out_num=2000,
        held_out_groups=3,
        baseline_scales=(1.0, 1.2, 1.6, 2.0),
        partial_counts=3,
        interval_starts=(1 / 3, 2 / 3),
        finalists=4,
    ),
}

# The reports' search where no GPU is at hand (1-2 hours per budget on two CPU cores for a
# reference model, where `full` takes several): candidates on 1000 images, still 3 held-out
# groups of 2000.  Search-seed FDs then carry more finite-sample bias than held-out ones; the
# bias is near-constant across schedules of similar spread, so it ranks alike.  A smaller
# evolution (8 x 4) pays for the rest; the baselines keep the full preset's scales (partial
# guidance is best well above the default scale: 2x for digits-dit's best interval at 30%).  Its first
# generation is the best baselines on random warps rather than random members: with so few
# generations, the 30% searches of digits-dit and digits-flux ended on guidance that the best interval
# matched or beat on the same searched timesteps, so evolution starts from those.
PRESETS["cpu"] = {
    **PRESETS["full"],
    "population": 8,
    "generations": 4,
    "search_num": 1000,
    "finalists": 3,
    "warp_seeds": True,
}


def preset_config(
    preset: str, *, budget: float, steps: int, seed: int, images: int | None = None, own_timesteps: bool = True
) -> SearchConfig:
    """The configuration of ``preset`` for ``budget`` at ``steps`` full steps; checks every input.

    Step-count candidates are fractions of ``steps`` (``fast``: 12, 16, 20 of 25) or every count
    from 24% of ``steps`` up to ``steps`` (``full``); those the budget cannot pay for are dropped.
    ``images`` overrides the preset's images per candidate and per held-out group (one number for
    both: the Frechet distance's finite-sample bias depends on it).
    """
    if preset not in PRESETS:
        raise RstrError(f"--preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if not 0 < budget <= 1:
        raise RstrError(f"--budget {budget} must be in (0, 1]: the compute fraction of constant CFG at full steps")
    if steps < MIN_STEPS:
        raise RstrError(
            f"--steps {steps} is fewer than the {MIN_STEPS} steps the sampler supports; use --steps {MIN_STEPS} or more"
        )
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
    config = SearchConfig(
        budget=budget, steps=steps, preset=preset, seed=seed, step_counts=counts, own_timesteps=own_timesteps, **p
    )
    space(config, 1.0)  # refuse a budget too small for any schedule now, not after loading the model
    return config


def space(config: SearchConfig, w0: float, scheduler: Any = None) -> SearchSpace:
    """The search space of ``config`` for a model whose default CFG scale is ``w0`` and whose sampler is
    ``scheduler`` (set to the stock spacing of ``config.steps``): ``warp`` genes only when the config allows
    them and the scheduler takes own timesteps (:mod:`rstr.families.timesteps`)."""
    lo, hi = min(config.baseline_scales), max(config.baseline_scales)
    own = config.own_timesteps and scheduler is not None and supports_own_timesteps(scheduler)
    num_train = int(scheduler.config.num_train_timesteps) if scheduler is not None else 1000
    grid: dict[str, Any] = {}
    if own and not last_step_at_zero(scheduler):
        # the grid may start at the stock pipelines' sigma 1; mutation starts from the warp nearest their spacing
        grid = {"last_at_zero": False, "start_range": (0.80, 1.0), "stock_warp": _nearest_warp(scheduler, num_train)}
    return SearchSpace.for_budget(
        config.budget,
        config.steps,
        config.step_counts,
        w_max=config.w_max * w0,
        init_scales=(lo * w0, hi * w0),
        sigma=config.sigma * w0,
        own_timesteps=own,
        num_train=num_train,
        **grid,
    )


def _nearest_warp(scheduler: Any, num_train: int) -> tuple[float, float] | None:
    """``(start, rho)`` whose grid ``start * (1 - i / n) ** rho`` fits the scheduler's timesteps best (least
    squares in log space), or None when it has fewer than two."""
    s = np.asarray([float(t) / num_train for t in scheduler.timesteps])
    n = len(s)
    if n < 2:
        return None
    a = np.log(1 - np.arange(1, n) / n)
    rho = float(np.dot(a, np.log(s[1:] / s[0])) / np.dot(a, a))
    return float(s[0]), rho
