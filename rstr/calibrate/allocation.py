"""Stage-2 rank allocation: which LoRA rank each module gets under a parameter budget (pure: no torch).

Ranks come from ``RANKS`` (capped at ``min(in, out)``) and a LoRA of rank ``r`` on
``Linear(in, out)`` costs ``r * (in + out)`` parameters.  ``adaptive`` greedily takes the rank
step with the largest gain per added parameter that still fits the budget; ``uniform`` (the
ablation) raises every module to the same rank before any goes higher, block by block in turn,
so the budget is spread evenly over depth and layer kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rstr._io import read_json
from rstr.errors import RstrError

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # allowed positive ranks; 0 = no adapter
Method = Literal["adaptive", "uniform"]


@dataclass(frozen=True)
class TargetModule:
    """One ``nn.Linear`` inside a transformer block: what a LoRA can attach to."""

    name: str  # qualified name in the transformer
    block: str
    kind: str
    in_features: int
    out_features: int

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def cost(self, rank: int) -> int:
        """LoRA parameters at ``rank``: ``A`` is ``rank x in``, ``B`` is ``out x rank``."""
        return rank * (self.in_features + self.out_features)

    def ranks(self) -> list[int]:
        """The allowed ranks of this module, 0 first."""
        return [0, *(r for r in RANKS if r <= self.max_rank)]


def gain(spectrum: Sequence[float], rank: int) -> float:
    """Loss drop a rank-``rank`` adapter can buy: the sum of the first ``rank`` per-rank drops of :func:`measure_sensitivity`."""
    return float(sum(spectrum[:rank]))


def allocate(
    modules: Sequence[TargetModule], budget_params: int, method: Method, spectra: dict[str, list[float]] | None = None
) -> dict[str, int]:
    """Ranks per module (0 = no adapter) whose LoRA parameters fit ``budget_params``.

    ``adaptive`` takes, step by step, the next allowed rank of the module with the largest
    gain per added parameter; ``uniform`` raises the lowest ranks first, block by block in turn
    (cheapest layer first inside a block), ignoring sensitivity.
    """
    check_budget(modules, budget_params)
    if method == "adaptive" and spectra is None:
        raise ValueError("adaptive allocation needs the sensitivity spectra")
    order = _round_robin(modules)
    ranks = {m.name: 0 for m in modules}
    spent = 0
    while True:
        best, best_key = None, None
        for m in modules:
            allowed = m.ranks()
            i = allowed.index(ranks[m.name])
            if i + 1 == len(allowed):
                continue
            cur, nxt = allowed[i], allowed[i + 1]
            cost = m.cost(nxt) - m.cost(cur)
            if spent + cost > budget_params:
                continue
            if method == "adaptive":
                assert spectra is not None  # checked above
                key = ((gain(spectra[m.name], nxt) - gain(spectra[m.name], cur)) / cost, -order[m.name])
            else:
                key = (-cur, -order[m.name])
            if best_key is None or key > best_key:
                best, best_key = (m, nxt, cost), key
        if best is None:
            return ranks
        m, nxt, cost = best
        ranks[m.name] = nxt
        spent += cost


def check_budget(modules: Sequence[TargetModule], budget_params: int) -> None:
    """Refuse a budget that cannot hold the smallest rank on even the cheapest layer."""
    cheapest = min(m.cost(RANKS[0]) for m in modules)
    if budget_params < cheapest:
        raise RstrError(
            f"budget of {budget_params:,} parameters cannot hold even a rank-{RANKS[0]} LoRA on the smallest layer "
            f"({cheapest:,} parameters); raise --budget"
        )


def _round_robin(modules: Sequence[TargetModule]) -> dict[str, int]:
    """Position of each module when taking one layer per block in turn, cheapest first in a block."""
    by_block: dict[str, list[TargetModule]] = {}
    for m in modules:
        by_block.setdefault(m.block, []).append(m)
    slots = {}
    for b, members in enumerate(by_block.values()):
        for j, m in enumerate(sorted(members, key=lambda m: (m.in_features + m.out_features, m.name))):
            slots[m.name] = (j, b)
    return {name: i for i, name in enumerate(sorted(slots, key=slots.__getitem__))}


def ranks_from_file(path: Path, modules: Sequence[TargetModule]) -> dict[str, int]:
    """Ranks from an ``allocation.json``, checked against the model's layers and ``RANKS``."""
    data = read_json(path)
    try:
        given = {str(m["name"]): int(m["rank"]) for m in data["modules"]}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise RstrError(f"--allocation {path}: not a readable allocation.json ({type(err).__name__}: {err})") from None
    by_name = {m.name: m for m in modules}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise RstrError(
            f"--allocation {path}: module {unknown[0]} is not a linear layer of this model's blocks ({len(unknown)} unknown)"
        )
    for name, rank in given.items():
        m = by_name[name]
        if rank > m.max_rank:
            raise RstrError(
                f"--allocation {path}: rank {rank} for {name} exceeds the layer's dimensions ({m.in_features}x{m.out_features}, max rank {m.max_rank})"
            )
        if rank not in m.ranks():
            raise RstrError(f"--allocation {path}: rank {rank} for {name} is not one of {m.ranks()}")
    return {m.name: given.get(m.name, 0) for m in modules}
