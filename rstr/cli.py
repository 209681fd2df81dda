"""`rstr`: the PyTorch side -- inspect models, sample, evaluate, search schedules, calibrate.

Every command defaults to the reference model shipped with rstr.  A user error prints one
line and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from rstr._cli import run_app
from rstr.errors import RstrError

app = typer.Typer(
    name="rstr",
    help="Sparse guidance schedules (Stage-1), adaptive LoRA calibration (Stage-2) and evaluation for diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

ModelOpt = Annotated[
    Optional[Path],
    typer.Option("--model", help="Local diffusers directory (pipeline or transformer). Default: the reference digits DiT."),
]
ScheduleOpt = Annotated[Optional[Path], typer.Option("--schedule", help="Schedule JSON (rstr.schedule/1) from `rstr search`.")]
ScaleOpt = Annotated[Optional[float], typer.Option("--scale", help="Constant CFG scale, instead of --schedule.")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps for --scale (default: the model's default).")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="Stage-2 adapter directory from `rstr calibrate`.")]


def load_schedule_for(family, schedule: Path | None, scale: float | None, steps: int | None):
    """The schedule a command runs: a file, a constant scale, or the model's default constant CFG."""
    from rstr.schedule import GuidanceSchedule

    if schedule is not None and scale is not None:
        raise RstrError("give either --schedule or --scale, not both")
    if schedule is not None:
        s = GuidanceSchedule.load(schedule)
        s.check_fits(family.name)
        if steps is not None and steps != s.num_steps:
            raise RstrError(f"--steps {steps} differs from the schedule's {s.num_steps} steps; drop --steps")
        return s
    n = steps if steps is not None else family.default_steps
    if n < 1:
        raise RstrError(f"--steps {n} must be at least 1")
    w = scale if scale is not None else float(family.meta.get("default_scale", 4.0))
    return GuidanceSchedule.constant(w, n, family=family.name, sampler=family.sampler, default_steps=family.default_steps)


def load_family(model: Path | None, adapter: Path | None = None):
    """Load the model (and merge a Stage-2 adapter into it when given)."""
    from rstr.families import load_model

    family = load_model(model)
    if adapter is not None:
        from rstr.calibrate import apply_adapter

        apply_adapter(family, adapter)
    return family


@app.command()
def info(model: Annotated[Optional[Path], typer.Argument(help="Model directory (default: the reference model).")] = None,
         json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Describe a model: family, transformer class, parameters, blocks, scheduler and conditioning inputs."""
    family = load_family(model)
    desc = family.describe()
    if json_out:
        print(json.dumps(desc, indent=2))
        return
    table = Table(show_header=False, title=str(getattr(family, "path", model)))
    for k, v in desc.items():
        table.add_row(k, ", ".join(f"{c['name']} {c['shape']}" for c in v) if k == "conditioning" else f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)


@app.command()
def sample(
    model: ModelOpt = None,
    schedule: ScheduleOpt = None,
    scale: ScaleOpt = None,
    steps: StepsOpt = None,
    adapter: AdapterOpt = None,
    classes: Annotated[str, typer.Option("--classes", help="Comma-separated class labels (class-conditional models).")] = "0,1,2,3,4,5,6,7,8,9",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial noise.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Output: .png grid (reference model) or .npy latents.")] = Path("samples.png"),
) -> None:
    """Generate samples with a schedule (or constant CFG) and save a PNG grid or the latents.

    Example: `rstr sample --scale 1.5 --steps 8 --out digits.png`.
    """
    import numpy as np
    import torch

    from rstr._io import atomic_path
    from rstr.sampler import sample as run_sampler

    family = load_family(model, adapter)
    sched = load_schedule_for(family, schedule, scale, steps)
    if family.name != "dit":
        raise RstrError(f"`rstr sample` takes class labels; {family.name} needs text embeddings: use the Python API (rstr.sampler.sample)")
    try:
        labels = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        raise RstrError(f"--classes {classes!r} must be comma-separated integers, e.g. 0,1,2") from None
    cond = family.labels(labels)
    latents = run_sampler(family, sched, cond, generator=torch.Generator().manual_seed(seed), progress=True)
    if out.suffix == ".npy":
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, latents.cpu().numpy())
    elif out.suffix == ".png":
        from rstr.evaluate import sample_grid

        sample_grid(latents, labels, out)
    else:
        raise RstrError(f"--out {out}: use a .png or .npy file name")
    console.print(f"[green]wrote[/green] {out}  ({sched.describe()})")


def main() -> None:
    run_app(app, "rstr")


if __name__ == "__main__":
    main()
