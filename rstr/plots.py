"""PNG plots of schedules and search reports (matplotlib, Agg backend, atomic writes).

:func:`plot_schedule` is shared: the search report and the exporter's bundles draw schedules
the same way.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from rstr._io import atomic_path
from rstr.schedule import GuidanceSchedule

KIND_STYLE = {  # marker and colour per baseline kind, shared by both panels of the Pareto plot
    "constant": ("s", "tab:blue"),
    "first-k": ("^", "tab:orange"),
    "interval": ("D", "tab:green"),
    "conditional-only": ("v", "tab:gray"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_schedule(schedule: GuidanceSchedule, path: str | os.PathLike[str]) -> Path:
    """Bar per guided step at its CFG scale; unguided (conditional-only, one pass) steps marked at w = 1."""
    plt = _pyplot()
    n = schedule.num_steps
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 1.5), 3.0))
    guided = [i for i in range(n) if schedule.guided[i]]
    unguided = [i for i in range(n) if not schedule.guided[i]]
    ax.bar(guided, [schedule.scales[i] for i in guided], color="tab:blue", label="guided (2 passes)")
    ax.scatter(unguided, [1.0] * len(unguided), marker="x", color="tab:gray", zorder=3, label="unguided = cond. only (1 pass)")
    ax.axhline(1.0, color="tab:gray", lw=0.6, ls=":")
    ax.set_xticks(range(n))
    if schedule.timesteps is not None:  # the schedule's own timesteps under the step numbers
        ax.set_xticklabels([f"{i}\n{t}" for i, t in enumerate(schedule.timesteps)], fontsize=6)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("denoising step (0 = most noise)" + (" / timestep" if schedule.timesteps is not None else ""))
    ax.set_ylabel("CFG scale w")
    ax.set_title(schedule.describe(), fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    return _save(fig, path)


def plot_pareto(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Two panels: quality vs compute on search seeds (all candidates, both Pareto fronts) and on held-out seeds."""
    plt = _pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    metric = report["objective"]["metric"]
    budget = report["budget"]["compute_fraction"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))

    pts = report["points"]["search"]
    left.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, color="tab:purple", alpha=0.25, label="search candidates")
    for kind, (marker, color) in KIND_STYLE.items():
        bp = [p for p in report["points"]["baselines"] if p[2] == kind]
        if bp:
            left.scatter([p[0] for p in bp], [p[1] for p in bp], s=14, marker=marker, color=color, alpha=0.5, label=kind)
    for key, color, label in (("pareto_front", "tab:purple", "search front"), ("baseline_front", "black", "baselines' front")):
        front = report[key]
        left.step(
            [e["compute_fraction"] for e in front],
            [e["search"]["mean"][metric] for e in front],
            where="post",
            color=color,
            lw=1.5,
            label=label,
        )
    res = report["result"]
    left.scatter(
        [res["compute_fraction"]], [res["search"]["mean"][metric]], marker="*", s=160, color="red", zorder=5, label="result"
    )
    left.set_title("search seeds", fontsize=9)

    for b in report["baselines"]:
        marker, color = KIND_STYLE[b["kind"]]
        vals = b["held_out"]["groups"][metric]
        right.errorbar(
            [b["compute_fraction"]],
            [statistics.fmean(vals)],
            yerr=_range(vals),
            marker=marker,
            color=color,
            ms=5,
            capsize=2,
            ls="none",
            alpha=0.8 if b["in_budget"] else 0.4,
        )
    vals = res["held_out"]["groups"][metric]
    right.errorbar(
        [res["compute_fraction"]],
        [statistics.fmean(vals)],
        yerr=_range(vals),
        marker="*",
        ms=14,
        color="red",
        capsize=2,
        ls="none",
    )
    right.set_title(f"held-out seeds ({report['seeds']['held_out_groups']} groups, mean and min-max)", fontsize=9)

    lows = (
        min(e["search"]["mean"][metric] for e in report["pareto_front"] + report["baseline_front"]),
        min(min(e["held_out"]["groups"][metric]) for e in report["baselines"] + [res]),
    )
    for ax, low in zip((left, right), lows):
        if low > 0:
            ax.set_ylim(low * 0.9, low * 3)  # zoom on the good schedules: the cheapest ones are far off
        ax.axvline(budget, color="red", lw=0.8, ls="--")
        ax.set_xlabel("compute (fraction of constant CFG at full steps)")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    left.legend(fontsize=7)
    fig.suptitle(f"budget {budget:.0%}: searched schedule vs simple baselines", fontsize=10)
    return _save(fig, path)


def _range(vals: list[float]) -> list[list[float]]:
    """Error bar from the lowest to the highest group value, around the mean."""
    m = statistics.fmean(vals)
    return [[m - min(vals)], [max(vals) - m]]
