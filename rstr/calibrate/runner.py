"""Stage-2 driver: check the inputs, measure, allocate, train (checkpointed, resumable exactly) and write the adapter."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rstr._progress import progress_bar
from rstr.calibrate.allocation import Method, TargetModule, allocate, check_budget, ranks_from_file
from rstr.calibrate.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from rstr.calibrate.modules import target_modules, transformer_params
from rstr.calibrate.report import write_outputs
from rstr.calibrate.sensitivity import measure_sensitivity
from rstr.calibrate.train import (
    PRESETS,
    Preset,
    lora_student,
    mean_loss,
    seed_conditioning,
    teacher_data,
    teacher_schedule,
    train_step,
)
from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule
from rstr.seeds import CALIBRATION_SEEDS, SeedRange


@dataclass
class CalibrationResult:
    """What :func:`calibrate` wrote and measured."""

    out: Path
    ranks: dict[str, int]
    params: int
    losses: list[float]
    validation_before: float
    validation_after: float
    seconds: float


def calibrate(
    family: Family,
    schedule: GuidanceSchedule,
    out: str | os.PathLike[str],
    *,
    preset: str | Preset = "full",
    budget: float = 0.01,
    allocation: Method | Path = "adaptive",
    iterations: int | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    teacher: GuidanceSchedule | None = None,
) -> CalibrationResult:
    """Allocate ranks by sensitivity, train the LoRA against the teacher and write ``out``.

    The teacher is the uncalibrated model under ``teacher`` (default: constant CFG at the model's scale
    and full steps).  It must be better than the student for calibration to help: where the sparse
    schedule already beats constant CFG, pass a better schedule (e.g. a Stage-1 result at full compute).

    Calibration seed ``seed`` uses the images ``CALIBRATION_SEEDS.start + seed * (pool + validation)``
    onward.  ``family`` is left untouched (the student is a copy).  A checkpoint beside ``out`` is
    written every ``preset.checkpoint_every`` iterations; ``resume`` continues from it exactly.
    Every user error is raised before anything is computed or written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    p = PRESETS.get(preset) if isinstance(preset, str) else preset
    if p is None:
        raise RstrError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    iterations = p.iterations if iterations is None else iterations
    settings, modules = _check_inputs(
        family, schedule, teacher or teacher_schedule(family), out, p, budget, allocation, iterations, seed, force
    )
    settings["preset"] = preset if isinstance(preset, str) else "custom"
    ckpt = checkpoint_path(out)
    names = [m.name for m in modules]
    state = (load_checkpoint(ckpt, settings, names) if resume else None) or _initial_state(
        family, schedule, modules, p, settings, allocation
    )
    pool, val = state["pool"].to(family.device), state["validation"].to(family.device)

    student, peft_model, params, opt = lora_student(family, state["ranks"], seed, p.lr)
    warmup = max(1, iterations // 20)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations))
    )
    gen = torch.Generator().manual_seed(seed)
    if "lora" in state:
        try:
            peft_model.load_state_dict(state["lora"], strict=False)
            opt.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
            gen.set_state(state["generator"])
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            raise RstrError(
                f"checkpoint {ckpt} does not fit this calibration ({type(err).__name__}: {str(err).partition(chr(10))[0]}); "
                "delete it or run without --resume"
            ) from None
    losses: list[float] = list(state["losses"])

    with progress_bar(iterations, "calibrate", enabled=progress) as bar:
        bar.advance(state["iteration"])
        for it in range(state["iteration"], iterations):
            loss = train_step(student, schedule, pool, p.batch_size, params, opt, gen)
            lr_sched.step()
            losses.append(loss.item())
            bar.advance()
            bar.note(f"loss {sum(losses[-10:]) / len(losses[-10:]):.4g}")
            if (it + 1) % p.checkpoint_every == 0 and it + 1 < iterations:
                lora = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
                save_checkpoint(
                    ckpt,
                    {
                        **state,
                        "iteration": it + 1,
                        "losses": losses,
                        "lora": lora,
                        "optimizer": opt.state_dict(),
                        "lr_scheduler": lr_sched.state_dict(),
                        "generator": gen.get_state(),
                    },
                )

    ranks = state["ranks"]
    used = sum(m.cost(ranks[m.name]) for m in modules)
    result = CalibrationResult(
        out, ranks, used, losses, state["validation_before"], mean_loss(student, schedule, val), time.perf_counter() - t0
    )
    write_outputs(out, force, peft_model, family, schedule, modules, state["spectra"], result, settings)
    ckpt.unlink(missing_ok=True)
    return result


def _check_inputs(
    family: Family,
    schedule: GuidanceSchedule,
    teacher: GuidanceSchedule,
    out: Path,
    p: Preset,
    budget: float,
    allocation: Method | Path,
    iterations: int,
    seed: int,
    force: bool,
) -> tuple[dict, list[TargetModule]]:
    """Refuse bad input with one line each; return the run's settings and the target modules."""
    if iterations < 1:
        raise RstrError(f"--steps {iterations} must be at least 1 training iteration")
    if not 0 < budget < 1:
        raise RstrError(f"--budget {budget} must be a fraction of the transformer's parameters in (0, 1), e.g. 0.01")
    if seed < 0:
        raise RstrError(f"--seed {seed} must be >= 0")
    if p.probe > p.pool:
        raise RstrError(f"the preset probes {p.probe} images but its pool holds only {p.pool}")
    if out.exists() and any(out.iterdir()) and not force:
        raise RstrError(f"{out} already exists; choose another --out or pass --force to replace it")
    schedule.check_fits(family.name, family.sampler)
    teacher.check_fits(family.name, family.sampler)
    if schedule == teacher:
        raise RstrError(f"the schedule is the teacher itself ({teacher.describe()}); there is nothing to calibrate")
    modules = target_modules(family)
    budget_params = int(budget * transformer_params(family))
    if isinstance(allocation, Path):
        ranks = ranks_from_file(allocation, modules)
        used = sum(m.cost(ranks[m.name]) for m in modules)
        if used > budget_params:
            raise RstrError(
                f"--allocation {allocation} uses {used:,} parameters, more than the budget {budget_params:,}; raise --budget"
            )
        if used == 0:
            raise RstrError(f"--allocation {allocation} gives every module rank 0; nothing to train")
    elif allocation in ("adaptive", "uniform"):
        check_budget(modules, budget_params)
    else:
        raise RstrError(f"allocation {allocation!r} is unknown; use adaptive, uniform or an allocation.json")
    per_seed = p.pool + p.validation
    seeds = SeedRange(CALIBRATION_SEEDS.start + seed * per_seed, CALIBRATION_SEEDS.start + (seed + 1) * per_seed)
    seeds.require_within(CALIBRATION_SEEDS, "calibration seeds (lower --seed)")
    settings = {
        "model": str(family.path) if family.path is not None else type(family.transformer).__name__,
        "family": family.name,
        "transformer": type(family.transformer).__name__,
        "schedule": schedule.to_dict(),
        "schedule_sha256": schedule.sha256(),
        "teacher": teacher.to_dict(),
        "preset_settings": asdict(p),
        "iterations": iterations,
        "budget": budget,
        "budget_params": budget_params,
        "allocation": str(allocation),
        "seed": seed,
        "calibration_seeds": [seeds.start, seeds.stop],
    }
    return settings, modules


def _initial_state(
    family: Family, schedule: GuidanceSchedule, modules: list[TargetModule], p: Preset, settings: dict, allocation: Method | Path
) -> dict:
    """Teacher samples, sensitivity, ranks and the uncalibrated validation loss: everything before training."""
    start, stop = settings["calibration_seeds"]
    noise, cond = seed_conditioning(family, range(start, stop))
    data = teacher_data(family, GuidanceSchedule.from_dict(settings["teacher"], "teacher"), noise, cond)
    pool, val = data.take(slice(0, p.pool)), data.take(slice(p.pool, None))
    spectra = measure_sensitivity(family, schedule, pool.take(slice(0, p.probe)), modules, p, settings["seed"])
    if isinstance(allocation, Path):
        ranks = ranks_from_file(allocation, modules)
    else:  # layers that do not reach the output get no adapter under either method
        live = [m for m in modules if spectra[m.name]]
        ranks = {m.name: 0 for m in modules} | allocate(live, settings["budget_params"], allocation, spectra)
    return {
        "settings": settings,
        "iteration": 0,
        "losses": [],
        "pool": pool,
        "validation": val,
        "spectra": spectra,
        "ranks": ranks,
        "validation_before": mean_loss(family, schedule, val),
    }
