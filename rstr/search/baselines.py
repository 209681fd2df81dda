"""The simple schedules of the field that a Stage-1 result has to beat, tuned on the search seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rstr.search.config import SearchConfig
from rstr.search.genome import MIN_STEPS, Genome, SearchSpace, quantize


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


def baseline_grid(space: SearchSpace, config: SearchConfig, w0: float) -> list[Baseline]:
    """The simple schedules tuned on search seeds, all within the budget unless marked.

    Scales are ``config.baseline_scales`` times the model's default scale ``w0``.

    * constant CFG at every step count ``n`` with ``2n`` passes in the budget (or the
      ``config.constant_counts`` largest), at each scale;
    * first-k and interval guidance that spend the whole budget: for ``config.partial_counts``
      step counts ``n`` spread between half the budget and the budget, ``k = max_passes - n``
      guided steps, first, or starting at each of ``config.interval_starts`` (fractions of the
      free room ``n - k``), at each scale;
    * conditional-only at the most steps the budget allows;
    * references beyond the budget: constant CFG (scale ``w0``) and conditional-only at full steps.
    """
    t, b = space.default_steps, space.max_passes
    scales = sorted({quantize(f * w0) for f in config.baseline_scales})
    counts = (
        list(range(MIN_STEPS, min(t, b // 2) + 1))[-config.constant_counts :]
        if config.constant_counts
        else range(MIN_STEPS, min(t, b // 2) + 1)
    )
    out = [Baseline("constant", Genome.span(n, 0, n, w)) for n in counts for w in scales]
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
