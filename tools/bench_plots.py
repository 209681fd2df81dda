"""The PNG plots of ``tools/bench.py``'s report: time per image, quality vs speed, ONNX Runtime overhead."""

from __future__ import annotations

from pathlib import Path

from bench_numbers import OVERHEAD_TARGET, _ms, e2e, speedup
from bench_setup import ROW_ENGINE, ROW_PRECISION, ROW_SCHEDULE, ROWS


# --------------------------------------------------------------------------------- plots
def plots(results: dict, directory: Path, rel: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    models = [m for m in results["models"].values() if "rows" in m]
    palette = ["#7f7f7f", "#17becf", "#bcbd22", "#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#2ca02c"]
    colors = {k: palette[i % len(palette)] for i, k in enumerate(ROWS)}

    def row_label(md: dict, k: str) -> str:  # which schedule and precision each bar is
        sched = md["schedules"].get(ROW_SCHEDULE[k], {}).get("compute_fraction")
        return f"{k} [{ROW_SCHEDULE[k]} {sched:.0%}, {ROW_PRECISION[k]}]" if sched is not None else k

    if models:
        heights = [0.8 + 0.22 * sum(1 for k in ROWS if e2e(md["rows"].get(k, {}), 1)) for md in models]
        fig, axes = plt.subplots(len(models), 1, figsize=(9, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights})
        for ax, md in zip(axes[:, 0], models):
            keys = [k for k in ROWS if e2e(md["rows"].get(k, {}), 1)]
            med = [e2e(md["rows"][k], 1)["median"] * 1e3 for k in keys]
            lo = [m - e2e(md["rows"][k], 1)["min"] * 1e3 for k, m in zip(keys, med)]
            hi = [e2e(md["rows"][k], 1)["max"] * 1e3 - m for k, m in zip(keys, med)]
            y = range(len(keys))
            ax.barh(list(y), med, xerr=[lo, hi], color=[colors[k] for k in keys], capsize=2)
            ax.set_yticks(list(y), [row_label(md, k) for k in keys], fontsize=7)
            ax.invert_yaxis()
            ax.set_xscale("log")
            for i, k in enumerate(keys):
                s = speedup(md, k, 1)
                label = f" {_ms(med[i])} ms" + (f"  ({s:.2f}×)" if s and k != "diffusers" else "")
                ax.text(med[i] * 1.05, i, label, va="center", fontsize=7)
            ax.set_title(f"{md['key']}: {md['title']} — ms per image, batch 1 (measured {md.get('started', '?')})", fontsize=9)
            ax.set_xlim(min(med) / 1.5, max(med) * 3)
        fig.tight_layout()
        fig.savefig(directory / "e2e.png", dpi=110)
        plt.close(fig)
        out["e2e"] = f"{rel}/e2e.png"

    ref = results["models"].get("ref", {})
    if ref.get("quality"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, r in ref["quality"]["rows"].items():
            t = e2e(ref["rows"][key], 1)
            if not t:
                continue
            fd = r["fd"]
            ax.errorbar(
                [t["median"] * 1e3],
                [r["fd_mean"]],
                yerr=[[r["fd_mean"] - min(fd)], [max(fd) - r["fd_mean"]]],
                xerr=[[(t["median"] - t["min"]) * 1e3], [(t["max"] - t["median"]) * 1e3]],
                fmt="o",
                color=colors[key],
                label=f"{row_label(ref, key)} (acc {r['accuracy_mean']:.2f})",
                capsize=3,
            )
        ax.set_xscale("log")
        ax.set_xlabel("ms per image, batch 1 (log)")
        ax.set_ylabel("held-out FD (lower is better)")
        ax.set_title(f"reference model: quality vs speed (measured {ref.get('started', '?')})", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / "quality.png", dpi=110)
        plt.close(fig)
        out["quality"] = f"{rel}/quality.png"

    bars = []
    for md in models:
        for key in [k for k in ROWS if ROW_ENGINE[k] == "ort"]:
            for b, o in (md["rows"].get(key, {}).get("overhead") or {}).items():
                bars.append((f"{md['key']} {key} b{b}", o))
    if bars:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(bars)))
        y = list(range(len(bars)))
        stp = [100 * o["step_graphs_ms"] / o["infer_ms"] for _, o in bars]
        host = [100 * o["host_fraction"] for _, o in bars]
        ax.barh(y, host, color="#d62728", label="host: plan walk, binding, input checks (Python)")
        ax.barh(y, stp, left=host, color="#ff7f0e", label="step graphs (CFG combine + scheduler update)")
        top = max(h + s_ for h, s_ in zip(host, stp))
        for i, (h, s_) in enumerate(zip(host, stp)):
            ax.text(h + s_ + top * 0.01, i, f"{h:.2f}% + {s_:.2f}%", va="center", fontsize=7)
        ax.axvline(100 * OVERHEAD_TARGET, color="k", ls="--", lw=0.8)
        ax.text(100 * OVERHEAD_TARGET, -0.8, " 2% target (host)", fontsize=7)
        ax.set_yticks(y, [n for n, _ in bars], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(top, 100 * OVERHEAD_TARGET) * 1.35)
        ax.set_xlabel("% of OnnxRuntimeRunner.infer time spent outside the denoiser session")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(directory / "overhead.png", dpi=110)
        plt.close(fig)
        out["overhead"] = f"{rel}/overhead.png"
    return out
