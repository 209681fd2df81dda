"""Stage-2 ablation on the reference model: does calibration help, and does adaptive allocation beat uniform?

For a sparse schedule (Stage-1's if given, else rstr's hand-made default) this script

1. scores the uncalibrated model and the full-CFG teacher on ``--groups`` held-out seed groups;
2. calibrates with ``adaptive`` and ``uniform`` allocation at the same budget for every
   calibration seed in ``--seeds`` (adapters are kept in ``--work`` and reused on a rerun);
3. merges each adapter and scores it on the same held-out groups (paired: same noise, same classes);
4. writes ``--out`` (markdown), a PNG and a JSON of every number beside it.

Usage (the numbers in docs/stage2.md came from the command recorded in that file)::

    python tools/stage2_ablation.py                       # CPU, about an hour on two cores
    python tools/stage2_ablation.py --device cuda         # the same on a GPU, minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rstr import calibrate as stage2
from rstr._io import atomic_path, write_json
from rstr.errors import RstrError
from rstr.evaluate import HELD_OUT_SEEDS, EvalResult, evaluate
from rstr.families import REFERENCE_MODEL, load_model
from rstr.schedule import GuidanceSchedule

METHODS = ("adaptive", "uniform")


def load_schedule(args: argparse.Namespace, family) -> GuidanceSchedule:
    schedule = GuidanceSchedule.load(args.schedule) if args.schedule else stage2.default_schedule(family)
    schedule.check_fits(family.name, family.sampler)
    if schedule.compute_fraction > 0.5:
        raise RstrError(f"the schedule uses {schedule.compute_fraction:.0%} of constant CFG; this ablation is about schedules at <= 50%")
    return schedule


def score(family, schedule: GuidanceSchedule, args: argparse.Namespace) -> EvalResult:
    return evaluate(family, schedule, num=args.num, groups=args.groups, seed_start=HELD_OUT_SEEDS.start, progress=False)


def calibrated_family(args: argparse.Namespace, schedule: GuidanceSchedule, method: str, seed: int) -> tuple[object, dict]:
    """Calibrate (or reuse a finished adapter with the same settings) and return the merged family."""
    adapter = args.work / f"{method}-seed{seed}"
    record_path = adapter / "calibration.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    wanted = {"schedule_sha256": schedule.sha256(), "preset": args.preset, "budget": args.budget, "allocation": method, "seed": seed}
    if record is None or any(record.get(k) != v for k, v in wanted.items()):
        family = load_model(args.model, device=args.device)
        stage2.calibrate(family, schedule, adapter, preset=args.preset, budget=args.budget, allocation=method, seed=seed,
                         resume=True, force=True, progress=False)
        record = json.loads(record_path.read_text())
    family = load_model(args.model, device=args.device)
    stage2.apply_adapter(family, adapter)
    return family, record


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL)
    p.add_argument("--schedule", type=Path, help="Stage-1 schedule JSON (default: rstr.calibrate.default_schedule)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    p.add_argument("--preset", default="full")
    p.add_argument("--budget", type=float, default=0.01)
    p.add_argument("--num", type=int, default=500, help="images per held-out group")
    p.add_argument("--groups", type=int, default=3, help="held-out seed groups")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=Path("out/stage2"), help="where adapters are kept between runs")
    p.add_argument("--out", type=Path, default=Path("docs/stage2.md"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(2)
    try:
        return run(args, " ".join(["python", "tools/stage2_ablation.py", *(argv if argv is not None else sys.argv[1:])]))
    except RstrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, command: str) -> int:
    t0 = time.perf_counter()
    base = load_model(args.model, device=args.device)
    schedule = load_schedule(args, base)
    teacher = stage2.teacher_schedule(base)
    print(f"schedule: {schedule.describe()}\nteacher: {teacher.describe()}", flush=True)
    results: dict[str, dict] = {"teacher": score(base, teacher, args).to_dict(), "uncalibrated": score(base, schedule, args).to_dict()}
    print(f"teacher       FD {results['teacher']['fd']}\nuncalibrated  FD {results['uncalibrated']['fd']}", flush=True)
    runs: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
    for seed in args.seeds:
        for method in METHODS:
            family, record = calibrated_family(args, schedule, method, seed)
            r = score(family, schedule, args)
            allocation = json.loads((args.work / f"{method}-seed{seed}" / "allocation.json").read_text())
            runs[method][seed] = {
                "eval": r.to_dict(),
                "validation_loss": record["validation_loss"],
                "seconds": record["seconds"],
                "lora_params": record["lora_params"],
                "blocks": allocation["blocks"],
                "kinds": allocation["kinds"],
            }
            print(f"{method:9s} seed {seed}: FD {[round(x, 3) for x in r.fd]}, calibration {record['seconds']:.0f} s", flush=True)
    data = {"command": command, "device": args.device, "schedule": schedule.to_dict(), "teacher": teacher.to_dict(),
            "budget": args.budget, "preset": args.preset, "num": args.num, "groups": args.groups,
            "held_out_seeds": [HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + args.num * args.groups],
            "results": results, "runs": runs, "seconds": round(time.perf_counter() - t0)}
    write_json(args.out.with_suffix(".json"), data)
    plot(data, args.out.with_suffix(".png"))
    with atomic_path(args.out) as tmp:
        tmp.write_text(report(data, schedule, teacher, args.out.with_suffix(".png").name))
    print(f"wrote {args.out}", flush=True)
    return 0


def report(data: dict, schedule: GuidanceSchedule, teacher: GuidanceSchedule, png: str) -> str:
    groups = data["groups"]
    uncal = data["results"]["uncalibrated"]["fd"]
    seeds = sorted(data["runs"]["adaptive"], key=int)
    lines = [
        "# Stage-2 ablation: calibration under a sparse schedule, adaptive vs uniform ranks",
        "",
        f"- student schedule: {schedule.describe()}",
        f"- teacher: {teacher.describe()}, scale {teacher.scales[0]}",
        f"- LoRA budget {data['budget']:.0%} of the transformer, preset `{data['preset']}`, calibration seeds {', '.join(map(str, seeds))}",
        f"- held-out seeds [{data['held_out_seeds'][0]}, {data['held_out_seeds'][1]}): {groups} groups of {data['num']} images, "
        "every model sampled from the same noise and classes (paired)",
        f"- device `{data['device']}`, {data['seconds'] / 60:.0f} minutes in all; rerun: `{data['command']}`",
        "",
        f"![FD per held-out group, loss and allocation]({png})",
        "",
        "How it works (details in `rstr/calibrate.py`): the loss is the mean squared difference between the "
        "student's final samples (LoRA model, sparse schedule) and the teacher's (uncalibrated model, constant CFG at "
        "full steps) from the same noise and class, back-propagated through the whole student sampling loop. A layer's "
        "sensitivity is the squared singular values of the mean gradient of that loss w.r.t. its weight at the "
        "uncalibrated model (the first-order loss drop a rank-r update can buy); `adaptive` greedily buys the rank step "
        "with the largest gain per LoRA parameter under the budget, `uniform` raises every layer to the same rank first, "
        "block by block in turn. FD is the digits Frechet distance of `rstr.evaluate` against the real digits.",
        "",
        "## Frechet distance per held-out group (lower is better)",
        "",
        "| model | " + " | ".join(f"group {g}" for g in range(groups)) + " | mean |",
        "|---|" + "---|" * (groups + 1),
        _row("teacher (constant CFG, full steps)", data["results"]["teacher"]["fd"]),
        _row("uncalibrated, sparse schedule", uncal),
    ]
    for method in METHODS:
        for seed in seeds:
            lines.append(_row(f"{method}, seed {seed}", data["runs"][method][seed]["eval"]["fd"]))
    lines += ["", "## Summary over calibration seeds (mean ± standard deviation)", "",
              "| allocation | FD (mean over groups) | groups better than uncalibrated | loss to teacher, validation | LoRA params | calibration time |",
              "|---|---|---|---|---|---|",
              f"| none | {statistics.mean(uncal):.3f} | - | {spread([data['runs']['adaptive'][s]['validation_loss']['uncalibrated'] for s in seeds])} | 0 | - |"]
    for method in METHODS:
        runs = [data["runs"][method][s] for s in seeds]
        fd = [statistics.mean(r["eval"]["fd"]) for r in runs]
        wins = [sum(a < b for a, b in zip(r["eval"]["fd"], uncal)) for r in runs]
        loss = [r["validation_loss"]["calibrated"] for r in runs]
        lines.append(f"| {method} | {spread(fd)} | {', '.join(f'{w}/{groups}' for w in wins)} | {spread(loss)} | "
                     f"{runs[0]['lora_params']:,} | {spread([r['seconds'] for r in runs])} s |")
    lines += ["", "## Where the adaptive ranks went (LoRA parameters, seed " + str(seeds[0]) + ")", "",
              "| block | adaptive | uniform | sensitivity share |", "|---|---|---|---|"]
    a, u = data["runs"]["adaptive"][seeds[0]]["blocks"], data["runs"]["uniform"][seeds[0]]["blocks"]
    total = sum(b["sensitivity"] for b in a.values()) or 1.0
    for name in a:
        lines.append(f"| {name} | {a[name]['params']:,} | {u[name]['params']:,} | {a[name]['sensitivity'] / total:.1%} |")
    lines += ["", "| layer kind | adaptive | uniform | sensitivity share |", "|---|---|---|---|"]
    a, u = data["runs"]["adaptive"][seeds[0]]["kinds"], data["runs"]["uniform"][seeds[0]]["kinds"]
    for name in a:
        lines.append(f"| {name} | {a[name]['params']:,} | {u[name]['params']:,} | {a[name]['sensitivity'] / total:.1%} |")
    return "\n".join(lines) + "\n"


def _row(name: str, fds: list[float]) -> str:
    return f"| {name} | " + " | ".join(f"{x:.3f}" for x in fds) + f" | {statistics.mean(fds):.3f} |"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = range(data["groups"])
    seeds = sorted(data["runs"]["adaptive"], key=int)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    width = 0.2
    bars = [("teacher", [data["results"]["teacher"]["fd"]]), ("uncalibrated", [data["results"]["uncalibrated"]["fd"]])]
    bars += [(m, [data["runs"][m][s]["eval"]["fd"] for s in seeds]) for m in METHODS]
    for i, (label, per_seed) in enumerate(bars):
        means = [statistics.mean(run[g] for run in per_seed) for g in groups]
        errs = [statistics.stdev(run[g] for run in per_seed) if len(per_seed) > 1 else 0.0 for g in groups]
        ax.bar([g + (i - 1.5) * width for g in groups], means, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks(list(groups), [f"group {g}" for g in groups])
    ax.set_ylabel("Frechet distance (held-out)")
    ax.set_title("FD per held-out group (mean ± sd over calibration seeds)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for m in METHODS:
        ax.plot(seeds, [data["runs"][m][s]["validation_loss"]["calibrated"] for s in seeds], "o-", label=m)
    ax.plot(seeds, [data["runs"]["adaptive"][s]["validation_loss"]["uncalibrated"] for s in seeds], "k--", label="uncalibrated")
    ax.set_xlabel("calibration seed")
    ax.set_ylabel("MSE to teacher samples (validation)")
    ax.set_title("calibration loss")
    ax.legend(fontsize=8)
    ax = axes[2]
    a, u = data["runs"]["adaptive"][seeds[0]]["blocks"], data["runs"]["uniform"][seeds[0]]["blocks"]
    x = range(len(a))
    ax.bar([i - 0.2 for i in x], [b["params"] for b in a.values()], 0.4, label="adaptive")
    ax.bar([i + 0.2 for i in x], [b["params"] for b in u.values()], 0.4, label="uniform")
    ax.set_xticks(list(x), [n.rsplit(".", 1)[-1] for n in a])
    ax.set_xlabel("block")
    ax.set_ylabel("LoRA parameters")
    ax.set_title(f"allocation (seed {seeds[0]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
