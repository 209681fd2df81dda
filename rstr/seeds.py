"""Seed ranges and the seed pools: search, calibration and held-out images never share a seed.

Noise is drawn per image from its seed (:func:`rstr.evaluate.noise_for_seeds`), so a seed range
names a set of images.  Seeds live in half-open ranges (:class:`SeedRange`); the pools below
never overlap, and a search is reported on held-out seeds it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from rstr.errors import RstrError


@dataclass(frozen=True)
class SeedRange:
    """Seeds ``start <= s < stop``, a half-open interval."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.stop, int)) or self.start < 0 or self.stop <= self.start:
            raise RstrError(f"seed range [{self.start}, {self.stop}) is empty or negative; give 0 <= start < stop")

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __contains__(self, seed: object) -> bool:
        return isinstance(seed, int) and self.start <= seed < self.stop

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})"

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop

    def contains_range(self, other: SeedRange) -> bool:
        return self.start <= other.start and other.stop <= self.stop

    def require_within(self, pool: SeedRange, what: str = "seeds") -> SeedRange:
        """Return ``self`` if it lies inside ``pool``, else raise naming both ranges."""
        if not pool.contains_range(self):
            raise RstrError(f"{what} {self} are not inside the pool {pool}; pick a seed_start inside it")
        return self

    def require_disjoint(self, other: SeedRange, what: str = "seed ranges") -> None:
        """Raise if the two ranges share a seed (e.g. search seeds leaking into held-out seeds)."""
        if self.overlaps(other):
            raise RstrError(f"{what} {self} and {other} overlap; use disjoint seed ranges (e.g. search vs held-out pools)")


def check_disjoint(*ranges: SeedRange) -> None:
    """Raise :class:`RstrError` if any two of ``ranges`` overlap."""
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            a.require_disjoint(b)


# One place for the seed pools.  Search never sees calibration, gate or held-out seeds; the build's
# gates decide on GATE_SEEDS, so its report on held-out seeds is an independent measurement.
SEARCH_SEEDS = SeedRange(0, 100_000)
CALIBRATION_SEEDS = SeedRange(100_000, 200_000)
GATE_SEEDS = SeedRange(200_000, 300_000)
HELD_OUT_SEEDS = SeedRange(1_000_000, 2_000_000)
check_disjoint(SEARCH_SEEDS, CALIBRATION_SEEDS, GATE_SEEDS, HELD_OUT_SEEDS)


def eval_seeds(seed_start: int, num: int, groups: int) -> SeedRange:
    """The seeds an evaluation of ``groups`` x ``num`` images from ``seed_start`` uses."""
    if num < 2 or groups < 1:
        raise RstrError(f"num {num} and groups {groups}: need num >= 2 images per group and groups >= 1")
    return SeedRange(seed_start, seed_start + num * groups)
