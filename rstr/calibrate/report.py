"""Stage-2 outputs: the adapter directory with ``allocation.json``, ``calibration.json``, ``report.md`` and a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rstr._io import atomic_dir, write_json
from rstr.calibrate.adapter import adapter_sha256
from rstr.calibrate.allocation import RANKS, TargetModule, gain
from rstr.calibrate.modules import transformer_params
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule

if TYPE_CHECKING:
    from rstr.calibrate.runner import CalibrationResult

ALLOCATION_FORMAT = "rstr.allocation/1"
CALIBRATION_FORMAT = "rstr.calibration/1"


def write_outputs(
    out: Path,
    force: bool,
    peft_model,
    family: Family,
    schedule: GuidanceSchedule,
    modules: list[TargetModule],
    spectra: dict[str, list[float]],
    result: CalibrationResult,
    settings: dict,
) -> None:
    """The adapter and its records, written to a temporary directory and renamed onto ``out``."""
    with atomic_dir(out, force=force) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        schedule.save(tmp / "schedule.json")
        write_json(tmp / "allocation.json", allocation_record(family, modules, result.ranks, spectra, settings))
        write_json(
            tmp / "calibration.json",
            {
                "format": CALIBRATION_FORMAT,
                **settings,
                "adapter_sha256": adapter_sha256(tmp),
                "lora_params": result.params,
                "validation_loss": {
                    "uncalibrated": result.validation_before,
                    "calibrated": result.validation_after,
                    "images": settings["preset_settings"]["validation"],
                },
                "losses": result.losses,
                "seconds": round(result.seconds, 1),
            },
        )
        write_report(tmp, family, schedule, modules, result, spectra, settings)


def allocation_record(
    family: Family, modules: Sequence[TargetModule], ranks: dict[str, int], spectra: dict[str, list[float]], settings: dict
) -> dict:
    """``allocation.json``: rank, parameters and sensitivity of every module, per block and kind."""
    total = transformer_params(family)
    used = sum(m.cost(ranks[m.name]) for m in modules)
    rows = []
    for m in modules:
        sens = gain(spectra[m.name], m.max_rank)
        rows.append(
            {
                "name": m.name,
                "block": m.block,
                "kind": m.kind,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "rank": ranks[m.name],
                "params": m.cost(ranks[m.name]),
                "sensitivity": sens,
                "sensitivity_per_param": sens / (m.in_features * m.out_features),
            }
        )
    return {
        "format": ALLOCATION_FORMAT,
        "family": family.name,
        "transformer": type(family.transformer).__name__,
        "method": settings["allocation"],
        "ranks_allowed": [0, *RANKS],
        "budget": {
            "fraction": settings["budget"],
            "params": settings["budget_params"],
            "used": used,
            "used_fraction": used / total,
            "transformer_params": total,
        },
        "blocks": _group(rows, "block"),
        "kinds": _group(rows, "kind"),
        "modules": rows,
    }


def _group(rows: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        g = out.setdefault(r[key], {"params": 0, "sensitivity": 0.0, "adapted": 0, "modules": 0})
        g["params"] += r["params"]
        g["sensitivity"] += r["sensitivity"]
        g["adapted"] += r["rank"] > 0
        g["modules"] += 1
    return out


def write_report(
    directory: Path,
    family: Family,
    schedule: GuidanceSchedule,
    modules: Sequence[TargetModule],
    result: CalibrationResult,
    spectra: dict[str, list[float]],
    settings: dict,
) -> None:
    """``report.md`` and ``calibration.png``: ranks and sensitivity per block and kind, loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, ranks = GuidanceSchedule.from_dict(settings["teacher"], "teacher"), result.ranks
    blocks = list(dict.fromkeys(m.block for m in modules))
    kinds = list(dict.fromkeys(m.kind for m in modules))
    params = {(b, k): 0 for b in blocks for k in kinds}
    sens = {(b, k): 0.0 for b in blocks for k in kinds}
    for m in modules:
        params[m.block, m.kind] += m.cost(ranks[m.name])
        sens[m.block, m.kind] += gain(spectra[m.name], m.max_rank)
    total_sens = sum(sens.values()) or 1.0

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(blocks))
    for ax, values, title in ((axes[0], params, "LoRA parameters per block"), (axes[1], sens, "sensitivity per block (share)")):
        bottom = [0.0] * len(blocks)
        for k in kinds:
            h = [values[b, k] / (total_sens if values is sens else 1) for b in blocks]
            ax.bar(x, h, bottom=bottom, label=k)
            bottom = [a + c for a, c in zip(bottom, h)]
        ax.set_xticks(list(x), [b.rsplit(".", 1)[-1] for b in blocks])
        ax.set_xlabel("block")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    axes[2].plot(range(1, len(result.losses) + 1), result.losses, lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    axes[2].set_title("calibration loss (MSE to teacher samples)")
    fig.tight_layout()
    fig.savefig(directory / "calibration.png", dpi=100)
    plt.close(fig)

    total = transformer_params(family)
    lines = [
        "# Stage-2 calibration",
        "",
        f"- model: `{settings['model']}` ({family.name}, {total:,} parameters)",
        f"- student schedule: {schedule.describe()}",
        f"- teacher: {teacher.describe()}, scales {', '.join(f'{w:g}' for w in sorted({w for w in teacher.scales if w is not None}))}",
        f"- allocation: {settings['allocation']}, budget {settings['budget']:.2%} = {settings['budget_params']:,} parameters, "
        f"used {result.params:,} ({result.params / total:.2%})",
        f"- preset {settings['preset']}, {settings['iterations']} iterations, seed {settings['seed']}, "
        f"calibration seeds [{settings['calibration_seeds'][0]}, {settings['calibration_seeds'][1]}), {result.seconds:.0f} s",
        f"- loss (MSE of final samples to the teacher's) on {settings['preset_settings']['validation']} validation images: "
        f"{result.validation_before:.4g} uncalibrated -> {result.validation_after:.4g} calibrated",
        "",
        "![ranks, sensitivity and loss](calibration.png)",
        "",
        "## Ranks per block and layer kind",
        "",
        "| block | " + " | ".join(kinds) + " | LoRA params | sensitivity share |",
        "|---|" + "---|" * (len(kinds) + 2),
    ]
    for b in blocks:
        cells = []
        for k in kinds:
            rs = [str(ranks[m.name]) for m in modules if m.block == b and m.kind == k]
            cells.append("/".join(rs) or "-")
        share = sum(sens[b, k] for k in kinds) / total_sens
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {sum(params[b, k] for k in kinds):,} | {share:.1%} |")
    lines += [
        "",
        "Sensitivity: the calibration loss a full-rank adapter on the module is predicted to remove: a rank-1 "
        "probe adapter's leave-one-out loss drop, spread over ranks by the module's Fisher eigenvalues "
        "(see `rstr.calibrate`).",
        "",
    ]
    (directory / "report.md").write_text("\n".join(lines))
