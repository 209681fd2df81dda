"""Stage-2 ablation on the reference model: does calibration help, and does adaptive allocation beat uniform?

For a sparse schedule (Stage-1's if given, else rstr's hand-made default) this script

1. scores the uncalibrated model and the full-CFG teacher on ``--groups`` held-out seed groups;
2. calibrates with ``adaptive`` and ``uniform`` allocation at each budget in ``--budgets`` for
   every calibration seed in ``--seeds`` (adapters are kept in ``--work`` and reused on a rerun;
   an interrupted calibration resumes from its checkpoint);
3. merges each adapter and scores it on the same held-out groups (paired: same noise, same classes);
4. writes ``--out`` (markdown), a PNG and a JSON of every number beside it.

Usage (docs/stage2/ablation.md records the exact command that produced it)::

    nice -n 10 python tools/stage2_ablation.py            # CPU: hours on two shared cores
    python tools/stage2_ablation.py --device cuda         # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rstr import calibrate as stage2
from rstr._io import atomic_path, write_json
from rstr.errors import RstrError
from rstr.evaluate import EvalResult, evaluate
from rstr.families import REFERENCE_MODEL, load_model
from rstr.schedule import GuidanceSchedule
from rstr.seeds import HELD_OUT_SEEDS

METHODS = ("adaptive", "uniform")


def load_schedule(args: argparse.Namespace, family) -> GuidanceSchedule:
    schedule = GuidanceSchedule.load(args.schedule) if args.schedule else stage2.default_schedule(family)
    schedule.check_fits(family.name, family.sampler)
    if schedule.compute_fraction > 0.5:
        raise RstrError(
            f"the schedule uses {schedule.compute_fraction:.0%} of constant CFG; this ablation is about schedules at <= 50%"
        )
    return schedule


def score(family, schedule: GuidanceSchedule, args: argparse.Namespace) -> EvalResult:
    return evaluate(family, schedule, num=args.num, groups=args.groups, seed_start=HELD_OUT_SEEDS.start, progress=False)


def label(method: str, budget: float) -> str:
    return f"{method} {budget:.2%}"


def calibrated_run(
    args: argparse.Namespace, schedule: GuidanceSchedule, teacher: GuidanceSchedule, method: str, budget: float, seed: int
) -> dict:
    """Calibrate toward ``teacher`` (or reuse a finished adapter with the same settings), merge it and score it."""
    adapter = args.work / f"{method}-{budget:g}-seed{seed}"
    record_path = adapter / "calibration.json"
    wanted = {
        "schedule_sha256": schedule.sha256(),
        "preset": args.preset,
        "budget": budget,
        "allocation": method,
        "seed": seed,
        "teacher": teacher.to_dict(),
    }
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if any(record.get(k) != v for k, v in wanted.items()):
        stage2.calibrate(
            load_model(args.model, device=args.device),
            schedule,
            adapter,
            preset=args.preset,
            budget=budget,
            allocation=method,
            seed=seed,
            resume=True,
            force=True,
            progress=False,
            teacher=teacher,
        )
        record = json.loads(record_path.read_text())
    family = load_model(args.model, device=args.device)
    stage2.apply_adapter(family, adapter)
    allocation = json.loads((adapter / "allocation.json").read_text())
    return {
        "eval": score(family, schedule, args).to_dict(),
        "validation_loss": record["validation_loss"],
        "seconds": record["seconds"],
        "lora_params": record["lora_params"],
        "blocks": allocation["blocks"],
        "kinds": allocation["kinds"],
    }


def spread(xs: list[float], fmt: str = ".3f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL)
    p.add_argument("--schedule", type=Path, help="Stage-1 schedule JSON (default: rstr.calibrate.default_schedule)")
    p.add_argument("--teacher", type=Path, help="teacher schedule JSON (default: constant CFG at the model's scale, full steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    p.add_argument("--preset", default="full")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.0025], help="LoRA budgets (fractions of the transformer)")
    p.add_argument("--num", type=int, default=500, help="images per held-out group")
    p.add_argument("--groups", type=int, default=3, help="held-out seed groups")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads) when --device cpu")
    p.add_argument("--work", type=Path, default=Path("out/stage2"), help="where adapters are kept between runs")
    p.add_argument("--out", type=Path, default=Path("docs/stage2/ablation.md"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    command = " ".join(["python", "tools/stage2_ablation.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args, command)
    except RstrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, command: str) -> int:
    t0 = time.perf_counter()
    base = load_model(args.model, device=args.device)
    schedule = load_schedule(args, base)
    teacher = GuidanceSchedule.load(args.teacher) if args.teacher else stage2.teacher_schedule(base)
    print(f"schedule: {schedule.describe()}\nteacher: {teacher.describe()}", flush=True)
    results = {"teacher": score(base, teacher, args).to_dict(), "uncalibrated": score(base, schedule, args).to_dict()}
    print(f"teacher       FD {results['teacher']['fd']}\nuncalibrated  FD {results['uncalibrated']['fd']}", flush=True)
    runs: dict[str, dict[int, dict]] = {}
    for budget in args.budgets:
        for seed in args.seeds:
            for method in METHODS:
                r = runs.setdefault(label(method, budget), {})[seed] = calibrated_run(
                    args, schedule, teacher, method, budget, seed
                )
                print(
                    f"{label(method, budget)} seed {seed}: FD {[round(x, 3) for x in r['eval']['fd']]}, "
                    f"loss {r['validation_loss']['calibrated']:.3g}, {r['seconds']:.0f} s",
                    flush=True,
                )
    data = {
        "command": command,
        "device": args.device,
        "schedule": schedule.to_dict(),
        "teacher": teacher.to_dict(),
        "budgets": args.budgets,
        "preset": args.preset,
        "preset_settings": asdict(stage2.PRESETS[args.preset]),
        "num": args.num,
        "groups": args.groups,
        "seeds": args.seeds,
        "held_out_seeds": [HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + args.num * args.groups],
        "results": results,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0),
    }
    write_json(args.out.with_suffix(".json"), data)
    plot(data, args.out.with_suffix(".png"))
    with atomic_path(args.out) as tmp:
        tmp.write_text(report(data, schedule, teacher, args.out.with_suffix(".png").name))
    print(f"wrote {args.out}", flush=True)
    return 0


def report(data: dict, schedule: GuidanceSchedule, teacher: GuidanceSchedule, png: str) -> str:
    groups, seeds = data["groups"], data["seeds"]
    uncal = data["results"]["uncalibrated"]["fd"]
    p = data["preset_settings"]
    lines = [
        "# Stage-2 ablation: calibration under a sparse schedule, adaptive vs uniform ranks",
        "",
        f"- student schedule: {schedule.describe()}",
        f"- teacher: {teacher.describe()}",
        f"- LoRA budgets {', '.join(f'{b:.2%}' for b in data['budgets'])} of the transformer; preset `{data['preset']}` "
        f"({p['iterations']} iterations of {p['batch_size']} images from a pool of {p['pool']}, lr {p['lr']}); "
        f"calibration seeds {', '.join(map(str, seeds))}",
        f"- held-out seeds [{data['held_out_seeds'][0]}, {data['held_out_seeds'][1]}): {groups} groups of {data['num']} images, "
        "every model sampled from the same noise and classes (paired)",
        f"- device `{data['device']}`, {data['seconds'] / 60:.0f} minutes in all; rerun: `{data['command']}`",
        "",
        f"![FD per held-out group, loss and allocation]({png})",
        "",
        "How it works (details in `rstr/calibrate/`): the loss is the mean squared difference between the "
        "student's final samples (LoRA model, sparse schedule) and the teacher's (uncalibrated model under the "
        "teacher schedule) from the same noise and class, back-propagated through the whole student sampling loop. A layer's "
        "sensitivity is the loss its adapter removes: a rank-1 LoRA on every layer is trained briefly (the probe) and "
        "each layer's adapter switched off in turn; the rise in loss is its rank-1 gain, spread over higher ranks like "
        "the eigenvalues of the layer's empirical Fisher (per-image-group gradients); `adaptive` greedily buys the rank step "
        "with the largest gain per LoRA parameter under the budget, `uniform` raises every layer to the same rank first, "
        "block by block in turn. FD is the digits Frechet distance of `rstr.evaluate` against the real digits.",
        "",
        "## Frechet distance per held-out group (lower is better)",
        "",
        "| model | " + " | ".join(f"group {g}" for g in range(groups)) + " | mean |",
        "|---|" + "---|" * (groups + 1),
        _row(f"teacher ({teacher.describe()})", data["results"]["teacher"]["fd"]),
        _row("uncalibrated, sparse schedule", uncal),
    ]
    for name, runs in data["runs"].items():
        for seed in seeds:
            lines.append(_row(f"{name}, seed {seed}", runs[seed]["eval"]["fd"]))
    lines += [
        "",
        "## Summary over calibration seeds (mean ± standard deviation)",
        "",
        "| allocation, budget | FD (mean of groups) | FD change vs uncalibrated | groups better than uncalibrated, per seed "
        "| loss to teacher (validation) | LoRA params | calibration time |",
        "|---|---|---|---|---|---|---|",
    ]
    first = next(iter(data["runs"].values()))
    lines.append(
        f"| none | {statistics.mean(uncal):.3f} | - | - | {first[seeds[0]]['validation_loss']['uncalibrated']:.3g} | 0 | - |"
    )
    for name, runs in data["runs"].items():
        rs = [runs[s] for s in seeds]
        fd = [statistics.mean(r["eval"]["fd"]) for r in rs]
        wins = [sum(a < b for a, b in zip(r["eval"]["fd"], uncal)) for r in rs]
        lines.append(
            f"| {name} | {spread(fd)} | {spread([f - statistics.mean(uncal) for f in fd])} | "
            f"{', '.join(f'{w}/{groups}' for w in wins)} | {spread([r['validation_loss']['calibrated'] for r in rs], '.3g')} | "
            f"{rs[0]['lora_params']:,} | {spread([r['seconds'] for r in rs], '.0f')} s |"
        )
    for budget in data["budgets"]:
        a, u = data["runs"][label("adaptive", budget)][seeds[0]], data["runs"][label("uniform", budget)][seeds[0]]
        total = sum(b["sensitivity"] for b in a["blocks"].values()) or 1.0
        lines += [
            "",
            f"## Where the LoRA parameters went at {budget:.2%} (seed {seeds[0]})",
            "",
            "| block or layer kind | adaptive | uniform | sensitivity share |",
            "|---|---|---|---|",
        ]
        for part in ("blocks", "kinds"):
            for name in a[part]:
                lines.append(
                    f"| {name} | {a[part][name]['params']:,} | {u[part][name]['params']:,} | "
                    f"{a[part][name]['sensitivity'] / total:.1%} |"
                )
    return "\n".join(lines) + "\n"


def _row(name: str, fds: list[float]) -> str:
    return f"| {name} | " + " | ".join(f"{x:.3f}" for x in fds) + f" | {statistics.mean(fds):.3f} |"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, seeds = range(data["groups"]), data["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    bars = [("teacher", [data["results"]["teacher"]["fd"]]), ("uncalibrated", [data["results"]["uncalibrated"]["fd"]])]
    bars += [(name, [runs[s]["eval"]["fd"] for s in seeds]) for name, runs in data["runs"].items()]
    width = 0.8 / len(bars)
    for i, (name, per_seed) in enumerate(bars):
        means = [statistics.mean(run[g] for run in per_seed) for g in groups]
        errs = [statistics.stdev(run[g] for run in per_seed) if len(per_seed) > 1 else 0.0 for g in groups]
        ax.bar([g + (i - (len(bars) - 1) / 2) * width for g in groups], means, width, yerr=errs, label=name, capsize=2)
    ax.set_xticks(list(groups), [f"group {g}" for g in groups])
    ax.set_ylabel("Frechet distance (held-out)")
    ax.set_title("FD per held-out group (mean ± sd over calibration seeds)")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(data["runs"])
    for j, name in enumerate(names):
        losses = [data["runs"][name][s]["validation_loss"]["calibrated"] for s in seeds]
        ax.plot([j] * len(losses), losses, "o", alpha=0.7)
    ax.axhline(data["runs"][names[0]][seeds[0]]["validation_loss"]["uncalibrated"], color="k", ls="--", label="uncalibrated")
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("MSE to teacher samples (validation)")
    ax.set_title("calibration loss, one dot per seed")
    ax.legend(fontsize=8)
    ax = axes[2]
    blocks = list(data["runs"][names[0]][seeds[0]]["blocks"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar(
            [i + (j - (len(names) - 1) / 2) * width for i in range(len(blocks))],
            [data["runs"][name][seeds[0]]["blocks"][b]["params"] for b in blocks],
            width,
            label=name,
        )
    ax.set_xticks(range(len(blocks)), [b.rsplit(".", 1)[-1] for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("LoRA parameters")
    ax.set_title(f"allocation per block (seed {seeds[0]})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
