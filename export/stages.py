"""The build's decisions: Stage-1 with a schedule gate, Stage-2 with an adapter gate.

Every decision is a paired comparison (:mod:`rstr.compare`) on the gate seeds
(:data:`rstr.seeds.GATE_SEEDS`), which neither the search, the calibration nor the held-out
report uses, so the report on held-out seeds stays an independent measurement:

* **schedule gate**: the search result must be no worse than the stock model's constant CFG
  at full steps on every gate group.  If it is worse, the best in-budget baselines of the same
  search (ranked on search seeds) are tried in turn; the first that passes ships.  If none
  passes, the best of them ships and the gate record says so.
* **Stage-2**: when the shipped schedule already beats constant CFG (its default teacher) on every
  gate group, calibrating toward it can only make it more like the teacher, i.e. worse (measured
  on the reference model, docs/stage2.md), so Stage-2 is skipped with that reason, unless the
  user gives a better teacher (``--teacher``, e.g. a Stage-1 result at a larger budget).
  Otherwise the adapter is trained and kept only if the calibrated model is no worse than the
  uncalibrated one under the schedule (**adapter gate**).

Gates score the gate groups one at a time and stop a comparison at the first group where the
candidate's FD is higher: "no worse on every group" has then failed whatever the other groups say
(the record shows the groups scored).  The adapter gate's side without the adapter is the schedule
gate's score of the shipped schedule, completed where it stopped early.

Models without a quality measure here (``family.quality == "teacher"``) are not gated: the
search result and the adapter ship, and the records say that nothing was compared.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rstr.compare import Comparison, Side, score
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule
from rstr.seeds import GATE_SEEDS

log = logging.getLogger("rstr")
GATE_NUM, GATE_GROUPS = 500, 2
MAX_CANDIDATES = 4  # schedules the gate tries before it gives up


@dataclass
class Gate:
    """One decision: what was compared, what ships, and why."""

    name: str
    decision: str
    comparisons: list[Comparison] = field(default_factory=list)
    chosen: int | None = None  # the comparison of what ships
    scores: list[GateScores] = field(default_factory=list, repr=False)  # the candidates' gate scores, by comparison

    @property
    def shipped(self) -> Comparison | None:
        return None if self.chosen is None else self.comparisons[self.chosen]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "decision": self.decision,
            "comparisons": [c.to_json() for c in self.comparisons],
            "chosen": self.chosen,
            "seeds": [GATE_SEEDS.start, GATE_SEEDS.start + GATE_NUM * GATE_GROUPS],
            "groups": GATE_GROUPS,
            "num": GATE_NUM,
        }


class GateScores:
    """One (model, schedule) on the gate seeds, scored group by group as the decisions need them."""

    def __init__(self, family: Family, schedule: GuidanceSchedule, label: str) -> None:
        self.family, self.schedule, self.label = family, schedule, label
        self.fd: list[float] = []
        self.accuracy: list[float] = []

    def upto(self, groups: int) -> None:
        """Score the gate groups before ``groups`` not scored yet (group ``g``: seeds ``start + g * GATE_NUM`` on)."""
        for g in range(len(self.fd), groups):
            s = score(self.family, self.schedule, self.label, seed_start=GATE_SEEDS.start + g * GATE_NUM, num=GATE_NUM, groups=1)
            self.fd += s.fd
            self.accuracy += s.accuracy

    def side(self, groups: int) -> Side:
        s = self.schedule
        return Side(self.label, s.describe(), s.passes_per_image, s.compute_fraction, self.fd[:groups], self.accuracy[:groups])


def gate_compare(candidate: GateScores, baseline: GateScores) -> Comparison:
    """Paired, group by group; stops after the first group where the candidate's FD is higher (it cannot pass)."""
    for g in range(1, GATE_GROUPS + 1):
        candidate.upto(g)
        baseline.upto(g)
        if candidate.fd[g - 1] > baseline.fd[g - 1]:
            break
    return Comparison(candidate.side(g), baseline.side(g), GATE_SEEDS.start, GATE_NUM, g)


def run_stage1(family: Family, preset: str, budget: float, seed: int, workdir: Path) -> list[GuidanceSchedule]:
    """Stage-1 search; writes the schedule and its report into ``workdir`` and returns the candidates, best first."""
    from rstr.search import preset_config, run_search, write_outputs

    config = preset_config(preset, budget=budget, steps=family.default_steps, seed=seed)
    log.info(f"[bold]Stage-1[/bold] searching a guidance schedule ({preset} preset, budget {budget:.0%})")
    with tempfile.TemporaryDirectory(prefix="rstr-search-") as checkpoints:
        result = run_search(family, config, checkpoints, out=workdir / "schedule.json", progress=True)
    write_outputs(result, workdir / "schedule.json")
    log.info(f"Stage-1 result: {result.schedule.describe()}")
    return result.candidates


def gate_schedule(family: Family, candidates: list[GuidanceSchedule]) -> tuple[GuidanceSchedule, Gate]:
    """The first candidate no worse than stock constant CFG on every gate group (else the best tried)."""
    if family.quality != "digits":
        return candidates[0], Gate(
            "schedule", "not gated: the model has no sample-quality measure here (no digits classifier); the search result ships"
        )
    stock = family.constant_cfg()
    log.info(
        f"schedule gate: the search result against the stock model's constant CFG ({stock.describe()}), "
        f"{GATE_GROUPS} x {GATE_NUM} gate seeds, paired"
    )
    stock_side = GateScores(family, stock, "stock constant CFG")
    gate = Gate("schedule", "")
    for i, candidate in enumerate(candidates[:MAX_CANDIDATES]):
        label = "search result" if i == 0 else f"fallback {i}"
        scores = GateScores(family, candidate, label)
        c = gate_compare(scores, stock_side)
        gate.comparisons.append(c)
        gate.scores.append(scores)
        log.info(f"  {label} ({candidate.describe()}): {c.describe()}")
        if c.no_worse:
            gate.decision = f"{label} ships: no worse than the stock model's constant CFG on every gate group ({c.verdict})"
            gate.chosen = i
            return candidate, gate
    gate.chosen = min(range(len(gate.comparisons)), key=lambda i: statistics.fmean(gate.comparisons[i].differences))
    gate.decision = (
        f"no candidate is no worse than the stock model's constant CFG on every gate group; "
        f"{gate.comparisons[gate.chosen].candidate.label} ships (the smallest loss)"
    )
    log.warning(f"schedule gate: {gate.decision}")
    return candidates[gate.chosen], gate


def run_stage2(
    family: Family,
    schedule: GuidanceSchedule,
    schedule_gate: Gate | None,
    preset: str,
    seed: int,
    workdir: Path,
    teacher: GuidanceSchedule | None = None,
) -> tuple[Path | None, Gate]:
    """Stage-2 when it can help; the adapter directory (None when skipped or when it costs quality) and the gate record.

    ``teacher`` (default: constant CFG at full steps) is what the student is calibrated toward.  The skip
    rule compares with constant CFG, so it applies to the default teacher only; a given teacher is trusted
    to be better than the student, and the adapter gate still keeps the adapter only where it helps.
    """
    from rstr.calibrate import apply_adapter, calibrate

    shipped = schedule_gate.shipped if schedule_gate is not None else None
    if teacher is None and shipped is not None and shipped.verdict == "better":
        return None, Gate(
            "adapter",
            "Stage-2 skipped: the schedule already beats its constant-CFG teacher on every gate "
            "group, and calibrating toward the teacher would make it worse (docs/stage2.md); "
            "--teacher takes a better one",
        )
    out = workdir / "adapter"
    what = "the constant-CFG teacher" if teacher is None else f"the teacher {teacher.describe()}"
    log.info(f"[bold]Stage-2[/bold] calibrating LoRA against {what} ({preset} preset)")
    calibrate(family, schedule, out, preset=preset, seed=seed, progress=True, teacher=teacher)
    if family.quality != "digits":
        return out, Gate(
            "adapter",
            "not gated: the model has no sample-quality measure here; the adapter ships "
            "(its loss to the teacher is in stages/adapter/report.md)",
        )
    calibrated = copy.deepcopy(family)
    apply_adapter(calibrated, out)
    without = GateScores(family, schedule, "without the adapter")
    if schedule_gate is not None and schedule_gate.chosen is not None and schedule_gate.scores:
        known = schedule_gate.scores[schedule_gate.chosen]  # the same model and schedule on the same seeds
        without.fd, without.accuracy = list(known.fd), list(known.accuracy)
    c = gate_compare(GateScores(calibrated, schedule, "with the adapter"), without)
    log.info(f"adapter gate: {c.describe()}")
    if c.no_worse:
        return out, Gate("adapter", "adapter merged: no worse than the uncalibrated model on every gate group", [c], 0)
    return None, Gate(
        "adapter", "adapter not used: it makes the samples worse on a gate group (kept in stages/adapter for inspection)", [c]
    )
