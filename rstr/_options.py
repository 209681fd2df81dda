"""What the commands that run a model share: their options, the --device and --dtype checks, loading the model.

``--device cpu|cuda|cuda:N`` places the transformer; ``--dtype fp32|fp16|bf16`` is the dtype its
weights are loaded in (the sampler feeds it that dtype and keeps the scheduler in fp32).  A device
torch cannot see, or a dtype the device cannot run, is refused in one line before any work.
Importing this module imports neither torch nor diffusers (``rstr-export run`` shares it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rstr.errors import RstrError

DTYPE_NAMES = ("fp32", "fp16", "bf16")

DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="Where the model runs: cpu, cuda or cuda:N (a GPU torch can see)."),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Dtype the transformer's weights are loaded and run in: fp32 (default), fp16 or bf16 (bf16 on CPU, or on a GPU that supports it).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object (nothing else on stdout).")]
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Local diffusers directory (pipeline or transformer), a reference model name (digits-dit, digits-pixart, digits-flux, digits-qwenimage) or a Hub id in the local cache. Default: the reference digits DiT.",
    ),
]
ScheduleOpt = Annotated[Path | None, typer.Option("--schedule", help="Schedule JSON (rstr.schedule/1) from `rstr search`.")]
ScaleOpt = Annotated[float | None, typer.Option("--scale", help="Constant CFG scale, instead of --schedule.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Sampling steps for --scale (default: the model's default).")]
AdapterOpt = Annotated[Path | None, typer.Option("--adapter", help="Stage-2 adapter directory from `rstr calibrate`.")]
PromptsOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="Prompt set (safetensors from tools/make_prompts.py): the conditioning drawn per image for models without classes (image i takes prompt i mod N).",
    ),
]


def load_schedule_for(family, schedule: Path | None, scale: float | None, steps: int | None):
    """The schedule a command runs: a file, a constant scale, or the model's default constant CFG."""
    from rstr.schedule import GuidanceSchedule

    if schedule is not None and scale is not None:
        raise RstrError("give either --schedule or --scale, not both")
    if schedule is not None:
        s = GuidanceSchedule.load(schedule)
        if steps is not None and steps != s.num_steps:
            raise RstrError(f"--steps {steps} differs from the schedule's {s.num_steps} steps; drop --steps")
    else:
        if steps is not None and steps < 1:
            raise RstrError(f"--steps {steps} must be at least 1")
        s = family.constant_cfg(scale, steps)
    s.check_fits(family.name, family.sampler, int(family.scheduler.config.get("num_train_timesteps", 1000)))
    return s


def notes(json_out: bool) -> Console:
    """Where a command's progress notes go: stdout, or stderr when ``--json`` keeps stdout for the result."""
    return Console(stderr=json_out)


def check_device(device: str) -> str:
    """``device`` when torch can run on it here; else :class:`RstrError` naming the devices there are."""
    if device == "cpu":
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    import torch

    if match is None or not torch.cuda.is_available():
        raise RstrError(f"--device {device}: torch sees no such device here; use --device cpu" + ("" if match else " or cuda"))
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise RstrError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def check_dtype(dtype: str, device: str) -> str:
    """``dtype`` when it is one rstr loads and ``device`` supports it; else :class:`RstrError`."""
    if dtype not in DTYPE_NAMES:
        raise RstrError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if dtype == "bf16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise RstrError(f"--dtype bf16: GPU {device} does not support bfloat16; use --dtype fp16 or fp32")
    return dtype


def probe(family, device: str, dtype: str) -> None:
    """Run the transformer once at batch 1, so that an op without a kernel for ``dtype`` fails in one line now."""
    import torch

    from rstr.families.base import expand_timestep

    cond, _ = family.example_conditioning(1)
    cond = family.check_conditioning({k: v.to(family.device) for k, v in cond.items()}, 1)
    x = torch.zeros(family.sample_shape(1), device=family.device, dtype=family.dtype)
    t = expand_timestep(family.model_timestep(torch.tensor(500.0)), 1, family.device).to(family.dtype)
    try:
        with torch.no_grad():
            family.denoise(x, t, cond)
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RstrError(
            f"--dtype {dtype} on {device}: this model cannot run there ({first}); use --dtype fp32"
            + (" or a GPU (--device cuda)" if device == "cpu" else "")
        ) from None


def load_family(
    model: Path | str | None,
    adapter: Path | None = None,
    device: str = "cpu",
    prompts: Path | None = None,
    dtype: str = "fp32",
):
    """Load the model onto ``device`` in ``dtype`` (and merge a Stage-2 adapter into it when given).

    Device and dtype are checked first; a dtype other than fp32 is probed with one transformer call.
    """
    from rstr.families import load_model

    check_dtype(dtype, check_device(device))
    family = load_model(model, device=device, dtype=dtype, prompts=prompts)
    if adapter is not None:
        from rstr.calibrate import apply_adapter

        apply_adapter(family, adapter)
    if dtype != "fp32":
        probe(family, device, dtype)
    return family
