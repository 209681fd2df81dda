"""Stage-1 outputs: the report dict, its Markdown rendering and the files a search writes."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstr._io import write_json
from rstr.search.baselines import Baseline
from rstr.search.genome import Genome
from rstr.search.objectives import Metrics, Objective

if TYPE_CHECKING:
    from rstr.search.runner import SearchResult, _Search

REPORT_FORMAT = "rstr.search-report/1"


def _entry(run: _Search, genome: Genome, **extra: Any) -> dict[str, Any]:
    """One schedule's record: what it is, and its scores on every seed group that scored it."""
    s = run.schedule_of(genome)
    d: dict[str, Any] = {
        **extra,
        "describe": s.describe(),
        "schedule": genome.key,
        "passes_per_image": genome.passes,
        "compute_fraction": s.compute_fraction,
        "timesteps": None if s.timesteps is None else list(s.timesteps),
    }
    for which, cache in (("search", run.state.search), ("validation", run.state.validation), ("held_out", run.state.held_out)):
        if genome.key in cache:
            m = cache[genome.key]
            d[which] = {
                "groups": m,
                "mean": {k: statistics.fmean(v) for k, v in m.items()},
                "feasible": run.objective.violation(m) == 0,
            }
    return d


def search_report(
    run: _Search,
    result: Genome,
    grid: list[Baseline],
    chosen: list[Baseline],
    regridded: list[tuple[str, Genome]],
    ablations: list[tuple[str, Genome]],
    seconds: float,
) -> dict[str, Any]:
    """``search-report.json``: the result against the selected baselines, the fronts and the run's history.
    ``regridded`` are the baselines that competed as finalists on the searched timesteps, labelled."""
    metric = run.objective.metric
    res = _entry(run, result, label="search result")
    held = res["held_out"]["groups"][metric]
    baselines = []
    for b in chosen:
        e = _entry(run, b.genome, kind=b.kind, label=b.label, in_budget=b.in_budget)
        theirs = e["held_out"]["groups"][metric]
        e["result_better_on_all_groups"] = all(a < t for a, t in zip(held, theirs))
        baselines.append(e)
    moved = [_entry(run, g, label=label) for label, g in ablations]
    for e, (_, g) in zip(moved, ablations):
        e["baseline"] = g.key != result.with_warp(None).key  # a simple schedule on the result's timesteps
        e["result_better_on_all_groups"] = all(a < t for a, t in zip(held, e["held_out"]["groups"][metric]))
    labels = {b.genome.key: f"baseline: {b.label}" for b in chosen}
    labels.update({g.key: f"baseline: {label}" for label, g in regridded})
    if result.key in labels:
        res["simple"] = labels[result.key].removeprefix("baseline: ")  # no evolved schedule did better
    front = pareto_front([(Genome.from_key(k), run.state.search[k]) for k in run.state.ga_keys], run.objective)
    bfront = pareto_front([(b.genome, run.state.search[b.genome.key]) for b in grid if b.in_budget], run.objective)
    return {
        "format": REPORT_FORMAT,
        "model": run.model,
        "config": run.config.to_json(),
        "objective": run.objective.describe(),
        "seeds": {
            "search": [run.search_seeds.start, run.search_seeds.stop],
            "validation": [run.validation_seeds.start, run.validation_seeds.stop],
            "held_out": [run.held_out_seeds.start, run.held_out_seeds.stop],
            "held_out_groups": run.config.held_out_groups,
            "held_out_num": run.config.held_out_num,
        },
        "budget": {
            "compute_fraction": run.config.budget,
            "max_passes_per_image": run.space.max_passes,
            "full_cfg_passes_per_image": 2 * run.config.steps,
        },
        "result": res,
        "finalists": [
            _entry(run, Genome.from_key(k), label=labels.get(k, "evolved"))
            for k in sorted(run.state.validation, key=run.final_rank)
        ],
        "baselines": baselines,
        "beats_every_in_budget_baseline": all(b["result_better_on_all_groups"] for b in baselines if b["in_budget"]),
        "beats_every_baseline_on_its_timesteps": all(e["result_better_on_all_groups"] for e in moved if e["baseline"]),
        "ablations": moved,
        "points": {
            "search": [
                [
                    Genome.from_key(k).passes / (2 * run.config.steps),
                    run.objective.value(run.state.search[k]),
                    run.objective.violation(run.state.search[k]) == 0,
                ]
                for k in run.state.ga_keys
            ],
            "baselines": [
                [b.genome.passes / (2 * run.config.steps), run.objective.value(run.state.search[b.genome.key]), b.kind]
                for b in grid
            ],
        },
        "pareto_front": [_entry(run, g) for g in front],
        "baseline_front": [_entry(run, g) for g in bfront],
        "history": run.state.history,
        "evaluations": {
            "search_seeds": len(run.state.search),
            "validation": len(run.state.validation),
            "held_out": len(run.state.held_out),
        },
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


def write_outputs(result: SearchResult, out: str | os.PathLike[str]) -> list[Path]:
    """Write the schedule to ``out`` and beside it ``search-report.json``, ``search-report.md`` and two PNGs."""
    from rstr.plots import plot_pareto, plot_schedule

    out = Path(out)
    result.schedule.save(out)
    paths = [
        out,
        out.with_name("search-report.json"),
        out.with_name("search-report.md"),
        out.with_name("search-schedule.png"),
        out.with_name("search-pareto.png"),
    ]
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
        cols = [
            name,
            str(e["passes_per_image"]),
            f"{e['compute_fraction']:.0%}",
            f"{s['mean'][metric]:.4f}",
            per,
            f"{h['mean'][metric]:.4f}",
        ]
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
        + (f", class accuracy >= {r['objective']['min_accuracy']}" if "min_accuracy" in r["objective"] else "")
        + ").",
        f"Search seeds {r['seeds']['search']} (one group of {c['search_num']} images), validation seeds {r['seeds']['validation']} "
        f"(the {c['finalists']} best evolved schedules and the best baseline of each kind, on the stock timesteps and on the "
        f"best evolved schedule's), held-out seeds {r['seeds']['held_out']} ({groups} groups of "
        f"{r['seeds']['held_out_num']} images, never seen by the search). Every schedule starts from the same noise.",
        f"Population {c['population']}, {c['generations']} generations, {r['evaluations']['search_seeds']} schedules scored "
        f"on search seeds, {r['seconds']:.0f} s (this run).",
        "",
        f"## Result: `{schedule_name}`",
        "",
        f"{res['describe']}; per step (`-` = unguided): `{res['schedule'].partition('@')[0]}`.",
        "",
        *(
            [f"**The result is a simple schedule** ({res['simple']}): no evolved schedule beat it on the search pool.", ""]
            if res.get("simple")
            else []
        ),
        *(
            [
                f"Its own timesteps (searched warp `@start^rho` = `{res['schedule'].partition('@')[2]}`; the baselines use the "
                f"sampler's stock spacing): `{res['timesteps']}`.",
                "",
            ]
            if res.get("timesteps")
            else []
        ),
        f"![schedule]({schedule_png})",
        "",
        f"Finalists, ranked by the mean over the search and validation groups ({metric}); the first is the result, "
        "so a simple schedule that beats every evolved one on both groups is the result itself:",
        "",
        "| schedule | what | passes/image | search | validation |",
        "|---|---|---|---|---|",
        *[
            f"| `{e['schedule']}` | {e.get('label', 'evolved')} | {e['passes_per_image']} | {e['search']['mean'][metric]:.4f} | "
            f"{e['validation']['mean'][metric]:.4f} |"
            for e in r["finalists"]
        ],
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
            "The result's guidance on the stock timesteps, and the best baseline of each kind on the result's timesteps "
            "(held-out seeds):",
            "",
            "| schedule | passes/image | held-out " + metric + " per group | held-out mean | result better on every group |",
            "|---|---|---|---|---|",
        ]
        for e in r["ablations"]:
            theirs = e["held_out"]["groups"][metric]
            lines.append(
                f"| {e['label']} | {e['passes_per_image']} | {' / '.join(f'{v:.4f}' for v in theirs)} | "
                f"{e['held_out']['mean'][metric]:.4f} | {'yes' if e['result_better_on_all_groups'] else 'no'} |"
            )
        grid = "beats" if r["beats_every_baseline_on_its_timesteps"] else "does NOT beat"
        lines += ["", f"On its own timesteps, the result {grid} the best baseline of every kind on every held-out group.", ""]
    lines += [
        "## Quality vs compute (search seeds)",
        "",
        f"![pareto]({pareto_png})",
        "",
        f"| compute | passes/image | search {metric} | schedule |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {e['compute_fraction']:.0%} | {e['passes_per_image']} | {e['search']['mean'][metric]:.4f} | {e['describe']} |"
        for e in r["pareto_front"]
    ]
    return "\n".join(lines) + "\n"
