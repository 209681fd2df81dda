"""Stage-1: evolutionary search for a sparse, variable-scale guidance schedule under a compute budget.

:func:`run_search` runs three phases, checkpointing after every batch of evaluations so that a
resumed run ends exactly where an uninterrupted one does:

1. **Baselines on search seeds.**  The simple schedules of the field -- constant CFG at every
   step count the budget allows, guidance on the first k steps ("Step AG"), guidance in an
   interval (Kynkaanniemi et al. 2024), conditional-only -- each at a few scales, scored on the
   search seeds.  The best of each kind (and of constant CFG at each step count) is what the
   result has to beat, so they are tuned exactly as hard as the search is: on the same seeds
   (:mod:`rstr.search.baselines`).
2. **Evolution** of a population seeded with those tuned baselines plus random members (see
   :mod:`rstr.search.genome`: :class:`Genome`, :func:`mutate`, :func:`crossover`, :func:`repair`,
   :func:`next_generation`).
   The best few schedules (``finalists``) are re-scored on a second group of search-pool seeds
   and the result is the best on both groups: picking the best of many noisy scores favours
   lucky ones (the winner's curse), and an independent group halves that luck.
3. **Held-out scoring.**  The result and the selected baselines are re-scored, paired (same
   noise for every schedule), on held-out seed groups the search never saw.

Fitness is pluggable (:mod:`rstr.search.objectives`): the digits Frechet distance with a
class-accuracy constraint for models that ship a digits classifier (the reference model), and
fidelity to the constant-CFG teacher's samples from the same noise for any other
class-conditional model.  The compute budget is hard: :func:`repair` makes every candidate fit
before it is scored.  Configuration and presets live in :mod:`rstr.search.config`, checkpoints
in :mod:`rstr.search.state`, the driver in :mod:`rstr.search.runner` and the outputs in
:mod:`rstr.search.report`.
"""

from rstr.search.config import PRESETS, SearchConfig, preset_config
from rstr.search.genome import Genome, SearchSpace, remap, repair
from rstr.search.objectives import Objective, objective_for
from rstr.search.report import write_outputs
from rstr.search.runner import SearchInterrupted, SearchResult, run_search
from rstr.search.state import load_checkpoint

__all__ = [
    "PRESETS",
    "Genome",
    "Objective",
    "SearchConfig",
    "SearchInterrupted",
    "SearchResult",
    "SearchSpace",
    "load_checkpoint",
    "objective_for",
    "preset_config",
    "remap",
    "repair",
    "run_search",
    "write_outputs",
]
