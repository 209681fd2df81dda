"""One table of Stage-1 results across models and budgets, from the searches' ``search-report.json`` files.

Every number comes from the reports (held-out groups, paired: the same noise for every schedule);
the table adds nothing measured.  Per report: the result, the best in-budget baseline on held-out
seeds (stock timesteps, and moved onto the result's timesteps), the paired per-group difference,
and the full-compute constant-CFG reference.

    python tools/search_summary.py docs/search/digits-qwenimage/budget-*/search-report.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def groups(entry: dict[str, Any], metric: str) -> list[float]:
    return entry["held_out"]["groups"][metric]


def per_group(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def best(entries: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return min(entries, key=lambda e: statistics.fmean(groups(e, metric)))


def on_its_timesteps(r: dict[str, Any], moved: list[dict[str, Any]], metric: str) -> str:
    """Whether the result beats, on every held-out group, the baselines moved onto its own timesteps
    (reports before every kind was moved hold the best baseline alone)."""
    if r["result"]["timesteps"] is None:
        return "(stock timesteps)"
    mine = groups(r["result"], metric)
    wins = all(all(a < b for a, b in zip(mine, groups(e, metric))) for e in moved)
    return ("yes" if wins else "**no**") + ("" if "beats_every_baseline_on_its_timesteps" in r else " (best baseline only)")


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    metric = r["objective"]["metric"]
    res = r["result"]
    mine = groups(res, metric)
    in_budget = [b for b in r["baselines"] if b["in_budget"]]
    stock = best(in_budget, metric)
    moved = [e for e in r["ablations"] if e["label"].endswith("on the result's timesteps")]
    full = [b for b in r["baselines"] if not b["in_budget"] and b["kind"] == "constant"]
    diff = [a - b for a, b in zip(mine, groups(stock, metric))]
    acc = res["held_out"]["mean"].get("accuracy")
    cells = [
        Path(r["model"]["path"]).name,
        f"{r['config']['budget']:.0%} ({r['config']['preset']}, {r['config']['search_num']} images/candidate)",
        f"{res['describe']}",
        f"{res['compute_fraction']:.0%}",
        per_group(mine),
        f"{stock['label']}: {per_group(groups(stock, metric))}",
        per_group(diff, 3),
        "yes" if r["beats_every_in_budget_baseline"] else "**no**",
        on_its_timesteps(r, moved, metric),
        per_group(groups(full[0], metric)) if full else "-",
        "-" if acc is None else f"{acc:.3f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="search-report.json files")
    args = p.parse_args()
    head = [
        "model",
        "budget",
        "result",
        "compute",
        "held-out FD per group",
        "best in-budget baseline: FD per group",
        "result minus it",
        "beats every baseline",
        "... and each kind's best on its timesteps",
        "constant CFG, full steps",
        "accuracy",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in args.reports:
        print(row(path))


if __name__ == "__main__":
    main()
