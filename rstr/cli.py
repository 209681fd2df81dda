"""`rstr`: the PyTorch side -- inspect models, sample, evaluate, search schedules, calibrate.

Every command defaults to the reference model shipped with rstr.  A user error prints one
line and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal, cast

import typer
from rich.console import Console
from rich.table import Table

from rstr._cli import run_app
from rstr._options import (
    AdapterOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PromptsOpt,
    ScaleOpt,
    ScheduleOpt,
    StepsOpt,
    load_family,
    load_schedule_for,
    notes,
)
from rstr.errors import RstrError

app = typer.Typer(
    name="rstr",
    rich_markup_mode="markdown",
    help="Sparse guidance schedules (Stage-1), adaptive LoRA calibration (Stage-2) and evaluation for diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.command()
def info(
    model: Annotated[
        Path | None, typer.Argument(help="Model directory, reference model name or cached Hub id (default: the reference model).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Describe a model: family, transformer class, parameters, blocks, scheduler and conditioning inputs."""
    family = load_family(model)
    desc = family.describe()
    if json_out:
        print(json.dumps(desc, indent=2))
        return
    table = Table(show_header=False, title=str(family.path))
    for k, v in desc.items():
        table.add_row(
            k,
            ", ".join(f"{c['name']} {c['shape']}" for c in v)
            if k == "conditioning"
            else f"{v:,}"
            if isinstance(v, int)
            else str(v),
        )
    console.print(table)


@app.command()
def sample(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    schedule: ScheduleOpt = None,
    scale: ScaleOpt = None,
    steps: StepsOpt = None,
    adapter: AdapterOpt = None,
    classes: Annotated[
        str,
        typer.Option(
            "--classes", help="Comma-separated class labels (models with classes: class labels, or a class table of prompts)."
        ),
    ] = "0,1,2,3,4,5,6,7,8,9",
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="Seed of the initial noise: rstr's seeded generator, the same noise as `rstr-export run --seed`, Pipeline(seed=) and rstr-run (docs/seeding.md).",
        ),
    ] = 0,
    noise: Annotated[
        Path | None,
        typer.Option(
            "--noise", help="Initial noise, float32 .npy of the model's sample shape for the --classes given; replaces --seed."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output: .png grid (reference model) or .npy latents.")] = Path(
        "samples.png"
    ),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """Generate samples with a schedule (or constant CFG) and save a PNG grid or the latents.

    Example: `rstr sample --scale 1.5 --steps 8 --out digits.png`.
    """
    import numpy as np
    import torch

    from rstr._io import atomic_path
    from rstr.engines.noise import check_seed, load_noise
    from rstr.sampler import sample as run_sampler

    check_seed(seed)
    family = load_family(model, adapter, device=device, prompts=prompts, dtype=dtype)
    sched = load_schedule_for(family, schedule, scale, steps)
    if out.suffix not in (".png", ".npy"):
        raise RstrError(f"--out {out}: use a .png or .npy file name")
    if out.suffix == ".png" and family.image is None:
        raise RstrError(f"--out {out}: this model's latents are not images (no 'image' in its rstr.json); use a .npy file name")
    try:
        labels = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        raise RstrError(f"--classes {classes!r} must be comma-separated integers, e.g. 0,1,2") from None
    cond, uncond = family.conditioning_for(torch.tensor(labels, dtype=torch.int64))
    start = {"seed": seed} if noise is None else {"noise": torch.from_numpy(load_noise(noise, family.sample_shape(len(labels))))}
    latents = run_sampler(family, sched, cond, uncond=uncond, progress=True, **start)
    if out.suffix == ".npy":
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, latents.cpu().numpy())
    else:
        from rstr.evaluate import sample_grid

        sample_grid(family.to_images(latents), labels, out)
    console.print(f"[green]wrote[/green] {out}  ({sched.describe()})")


@app.command()
def evaluate(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    schedule: ScheduleOpt = None,
    scale: ScaleOpt = None,
    steps: StepsOpt = None,
    adapter: AdapterOpt = None,
    num: Annotated[int, typer.Option("--num", help="Images per seed group.")] = 500,
    groups: Annotated[int, typer.Option("--groups", help="Consecutive seed groups; the spread over groups is reported.")] = 3,
    seed_start: Annotated[
        int | None, typer.Option("--seed-start", help="First seed (default: the start of the held-out pool, 1,000,000).")
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object (passes_per_image, compute_fraction, fd, fd_groups, accuracy, seconds, ...)."
        ),
    ] = False,
    grid: Annotated[Path | None, typer.Option("--grid", help="Also write a PNG grid of samples, one row per class.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """Score a schedule (or constant CFG) on the reference model: FD, accuracy, compute, time.

    Two evaluations with the same --seed-start, --num and --groups draw identical noise, so
    schedules compare group by group (paired).  Example: `rstr evaluate --scale 1.5 --steps 8 --json`.
    """
    from rstr.evaluate import evaluate as run_evaluate
    from rstr.evaluate import sample_grid
    from rstr.seeds import HELD_OUT_SEEDS

    family = load_family(model, adapter, device=device, prompts=prompts, dtype=dtype)
    sched = load_schedule_for(family, schedule, scale, steps)
    start = HELD_OUT_SEEDS.start if seed_start is None else seed_start
    result = run_evaluate(
        family, sched, num=num, groups=groups, seed_start=start, progress=not json_out, keep_images=grid is not None
    )
    record = {
        "schedule": sched.to_dict(),
        "passes_per_image": result.passes_per_image,
        "compute_fraction": result.compute_fraction,
        "fd": result.fd_mean,
        "fd_std": result.fd_std,
        "fd_groups": result.fd,
        "accuracy": result.accuracy,
        "accuracy_groups": result.accuracy_per_group,
        "seconds": result.seconds,
        "num": num,
        "groups": groups,
        "seeds": list(result.seeds),
    }
    if grid is not None:
        assert result.images is not None and result.labels is not None  # kept for the grid
        sample_grid(result.images, result.labels, grid)
    if json_out:
        print(json.dumps(record))
        return
    table = Table(title=sched.describe())
    for col in ("passes/image", "compute", "FD (mean ± sd)", "FD per group", "accuracy", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result.passes_per_image),
        f"{result.compute_fraction:.0%}",
        f"{result.fd_mean:.3f} ± {result.fd_std:.3f}",
        " / ".join(f"{v:.3f}" for v in result.fd),
        f"{result.accuracy:.3f}",
        f"{result.seconds:.1f}",
    )
    console.print(table)
    if grid is not None:
        console.print(f"[green]wrote[/green] {grid}")


@app.command()
def calibrate(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    schedule: Annotated[
        Path | None,
        typer.Option(
            "--schedule",
            help="Sparse schedule JSON from `rstr search`. Default: a hand-made one (a third of the steps, guidance on the first 60%).",
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="fast: ~1-2 minutes on two CPU cores (what `rstr-export build` runs); full: the default, under 10 minutes.",
        ),
    ] = "full",
    budget: Annotated[
        float, typer.Option("--budget", help="Trainable LoRA parameters as a fraction of the transformer's.")
    ] = 0.01,
    allocation: Annotated[
        str,
        typer.Option(
            "--allocation",
            help="adaptive: ranks follow sensitivity; uniform: the same rank everywhere (ablation); or an allocation.json to reuse.",
        ),
    ] = "adaptive",
    steps: Annotated[int | None, typer.Option("--steps", help="Training iterations (default: the preset's).")] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Calibration seed: picks the calibration images, the LoRA init and the batch order.")
    ] = 0,
    out: Annotated[
        Path, typer.Option("--out", help="Adapter directory to write (peft format plus allocation.json, report.md).")
    ] = Path("adapter"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint an interrupted run left beside --out.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            help="Schedule JSON the student must match (default: constant CFG at the model's scale and full steps). "
            "Where --schedule already beats constant CFG, give a better one, e.g. `rstr search --budget 1` output.",
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    json_out: JsonOpt = False,
) -> None:
    """Stage-2: train a per-module-rank LoRA so the model under a sparse schedule matches its teacher.

    Sensitivity of every linear layer in every block decides its rank under the budget; the
    adapter merges into the weights at export.  Example: `rstr calibrate --schedule s.json --out adapter`.
    """
    from rstr import calibrate as stage2
    from rstr.schedule import GuidanceSchedule

    family = load_family(model, device=device, prompts=prompts, dtype=dtype)
    if schedule is None:
        sched = stage2.default_schedule(family)
    else:
        sched = GuidanceSchedule.load(schedule)
    method = cast(Literal["adaptive", "uniform"], allocation) if allocation in ("adaptive", "uniform") else Path(allocation)
    if isinstance(method, Path) and not method.is_file():
        raise RstrError(f"--allocation {allocation}: use adaptive, uniform or an existing allocation.json")
    notes(json_out).print(f"calibrating for: {sched.describe()}")
    result = stage2.calibrate(
        family,
        sched,
        out,
        preset=preset,
        budget=budget,
        allocation=method,
        iterations=steps,
        seed=seed,
        resume=resume,
        force=force,
        teacher=None if teacher is None else GuidanceSchedule.load(teacher),
    )
    if json_out:
        keys = ("params", "ranks", "validation_before", "validation_after", "seconds")
        print(json.dumps({"out": str(result.out), "schedule": sched.to_dict(), **{k: getattr(result, k) for k in keys}}))
        return
    console.print(
        f"[green]wrote[/green] {out}: {result.params:,} LoRA parameters, loss to the teacher "
        f"{result.validation_before:.4g} -> {result.validation_after:.4g} on validation images, {result.seconds:.0f} s"
    )


@app.command()
def search(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Full step count: compute is counted against constant CFG at this many steps, and no schedule is longer. Default: the model's (25 for the reference).",
        ),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            "--budget",
            help="Compute budget in (0, 1]: transformer passes per image as a fraction of constant CFG at --steps. Default 0.5.",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="full (default): the search the reports quote, 2000 images per candidate and 3 held-out groups of 2000; ~2 minutes with --device cuda, about 2-3 hours on two CPU cores (--images 500: ~30-50 minutes, coarser). cpu: the same held-out comparison with 1000 images per candidate and a smaller evolution, 1-2 hours per budget on two CPU cores for a reference model. fast: ~2 minutes on CPU with small image counts (what `rstr-export build` runs).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed of the evolution's random draws (default 0). Image seeds come from fixed search and held-out pools.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Parallel workers, each with its own copy of the model; 1 runs inline. Local workers: at most the CPU cores here.",
        ),
    ] = 1,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="local: worker processes on this machine; ray: one Ray actor per worker, on a GPU when the cluster has them (pip install 'rstr\\[ray]'; RAY_ADDRESS picks a cluster).",
        ),
    ] = "local",
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="cpu, cuda or cuda:N: where the model and local workers run (Ray actors take a GPU when the cluster has one).",
        ),
    ] = "cpu",
    images: Annotated[
        int | None,
        typer.Option(
            "--images",
            help="Images per candidate and per held-out group (default: the preset's, 2000 for full). More resolves smaller quality differences; time grows in proportion.",
        ),
    ] = None,
    stock_timesteps: Annotated[
        bool | None,
        typer.Option(
            "--stock-timesteps/--own-timesteps",
            help="--own-timesteps (default; deterministic DDIM and flow-matching Euler): the search may also warp where the steps sit in time, and the schedule carries its timesteps; --stock-timesteps keeps the sampler's spacing.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Schedule JSON to write (default schedule.json); search-report.md/.json and PNG plots go beside it."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Checkpoint directory to continue (a search checkpoints into <out stem>.search/ beside --out). Options left out are taken from it; options given must match it.",
        ),
    ] = None,
    dtype: DtypeOpt = "fp32",
    json_out: JsonOpt = False,
) -> None:
    """Stage-1: search a sparse, variable-scale guidance schedule under a compute budget.

    An evolutionary search over per-step guided flags, scales and the step count, scored on
    search seeds; the result and the simple baselines (constant CFG at every step count that
    fits, first-k, interval, conditional-only; tuned on the same seeds) are re-scored on
    held-out seeds.  The reference model is scored by digits FD (class accuracy >= 0.98),
    other models by fidelity to their constant-CFG samples.  Checkpoints after every
    generation; Ctrl-C stops resumably.  Example: `rstr search --budget 0.3 --out s.json`.
    """
    from rstr import search as stage1

    saved = stage1.load_checkpoint(resume) if resume is not None else {}
    config_saved = saved.get("config", {})
    if model is None and saved.get("model", {}).get("path"):
        model = Path(saved["model"]["path"])
    if executor == "ray" and device != "cpu":
        raise RstrError(
            f"--device {device} applies to local workers; Ray actors take a GPU when the cluster has one: drop --device"
        )
    family = load_family(model, device=device, prompts=prompts, dtype=dtype)
    preset = preset if preset is not None else config_saved.get("preset", "full")
    if images is None and config_saved and config_saved.get("search_num") != stage1.PRESETS.get(preset, {}).get("search_num"):
        images = config_saved["search_num"]  # the resumed search ran with --images
    config = stage1.preset_config(
        preset,
        budget=budget if budget is not None else config_saved.get("budget", 0.5),
        steps=steps if steps is not None else config_saved.get("steps", family.default_steps),
        seed=seed if seed is not None else config_saved.get("seed", 0),
        images=images,
        own_timesteps=not stock_timesteps if stock_timesteps is not None else config_saved.get("own_timesteps", True),
    )
    out = out if out is not None else Path(saved.get("out") or "schedule.json")
    if out.suffix != ".json":
        raise RstrError(f"--out {out}: give a .json file name for the schedule, e.g. schedule.json")
    directory = resume if resume is not None else out.with_name(out.stem + ".search")
    notes(json_out).print(
        f"{'resuming' if resume else 'searching'}: preset {config.preset}, budget {config.budget:.0%} of constant CFG at "
        f"{config.steps} steps, seed {config.seed}; checkpoints in {directory}"
    )
    try:
        result = stage1.run_search(
            family, config, directory, resume=resume is not None, workers=workers, backend=executor, device=device, out=out
        )
    except stage1.SearchInterrupted as err:
        print(f"rstr: {err}; progress is saved: continue with `rstr search --resume {directory}`", file=sys.stderr)
        raise typer.Exit(130) from None
    paths = stage1.write_outputs(result, out)
    r, metric = result.report, result.report["objective"]["metric"]
    held = r["result"]["held_out"]["groups"][metric]
    if json_out:
        beats = r["beats_every_in_budget_baseline"]
        search_mean = r["result"]["search"]["mean"][metric]
        files = [str(p) for p in paths]
        print(
            json.dumps(
                {"out": str(out), "files": files, "schedule": result.schedule.to_dict(), "metric": metric}
                | {"search": search_mean, "held_out_groups": held, "beats_every_in_budget_baseline": beats}
            )
        )
        return
    console.print(f"result: {result.schedule.describe()}")
    console.print(
        f"  {metric}: search seeds {r['result']['search']['mean'][metric]:.4f}, held-out "
        + " / ".join(f"{v:.4f}" for v in held)
        + f"; {'beats' if r['beats_every_in_budget_baseline'] else 'does NOT beat'} every in-budget baseline on every held-out group"
    )
    console.print("[green]wrote[/green] " + ", ".join(str(p) for p in paths))


# ------------------------------------------------------------------ diffusers export (rstr.diffusers)
@app.command("export-diffusers")
def export_diffusers(
    schedule: Annotated[
        Path,
        typer.Option(
            "--schedule", help="Schedule JSON (rstr.schedule/1) from `rstr search`; written as the pipeline's guider config."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Pipeline directory to write (DiffusionPipeline.from_pretrained loads it).")],
    adapter: AdapterOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Local diffusers directory, reference model name (digits-dit) or Hub id (owner/name) in the local Hugging Face cache. Default: the reference digits DiT.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Write a diffusers pipeline directory that runs the schedule: adapter fused, the model's scheduler, the schedule as guider config.

    Load it with `rstr.diffusers.load_pipeline(out)` (or `DiffusionPipeline.from_pretrained(out)` and
    `rstr.diffusers.apply(pipe, ScheduledGuidance.from_pretrained(out, subfolder="guider"))`); see
    docs/diffusers.md.  Example: `rstr export-diffusers --schedule s.json --adapter adapter --out digits-pipe`.
    """
    from rstr.diffusers import export_pipeline
    from rstr.schedule import GuidanceSchedule

    sched = GuidanceSchedule.load(schedule)
    export_pipeline(model, sched, out, adapter=adapter, force=force)
    console.print(f"[green]wrote[/green] {out}  ({sched.describe()}{', adapter fused' if adapter else ''})")


def main() -> None:
    run_app(app, "rstr")


if __name__ == "__main__":
    main()
