"""One denoising loop for every family, driven by a :class:`GuidanceSchedule`.

Guided steps run the transformer once on a ``2B`` batch ``[cond; uncond]`` and combine;
unguided steps run it once on the ``B`` conditional rows only -- the unconditional branch is
never computed.  The loop mirrors the stock diffusers pipelines (same noise, timesteps and
scheduler calls), which the parity tests check to 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rstr._progress import progress_bar
from rstr.errors import RstrError
from rstr.families.base import Conditioning, Family, expand_timestep
from rstr.schedule import GuidanceSchedule


@dataclass(frozen=True)
class StepInfo:
    """What one step did, passed to ``callback``: enough for tracing and per-step checks."""

    index: int
    timestep: float
    model_timestep: float
    guided: bool
    scale: float | None
    sample: torch.Tensor  # x_t, the step's input
    model_output: torch.Tensor  # what the scheduler consumed (after guidance)
    next_sample: torch.Tensor  # x_{t-1}


def pair(cond: Conditioning, uncond: Conditioning) -> Conditioning:
    """The ``2B`` guided batch: conditional rows first, then unconditional."""
    return {k: torch.cat([cond[k], uncond[k]]) for k in cond}


def batch_size(cond: Conditioning) -> int:
    sizes = {int(v.shape[0]) for v in cond.values()}
    if len(sizes) != 1:
        raise RstrError(f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


@torch.no_grad()
def sample(
    family: Family,
    schedule: GuidanceSchedule,
    cond: Conditioning,
    *,
    uncond: Conditioning | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise from ``noise`` and return the final latents.

    Without ``noise``: ``seed`` draws rstr's seeded noise (:mod:`rstr.engines.noise`, the same
    numbers as ``Pipeline(seed=)`` and ``rstr-run --seed``); ``generator`` draws it the way the stock
    diffusers pipeline does with that torch generator (``family.noise``).
    """
    if sum(x is not None for x in (noise, seed, generator)) > 1:
        raise RstrError("give at most one of noise=, seed= and generator=")
    schedule.check_fits(family.name, family.sampler)
    b = batch_size(cond)
    cond = family.check_conditioning(cond, b)
    if schedule.num_guided:
        uncond = family.check_conditioning(uncond if uncond is not None else family.unconditional(cond), b, "unconditional")
        both = pair(cond, uncond)

    if seed is not None:
        from rstr.engines.noise import standard_normal

        noise = torch.from_numpy(standard_normal(seed, family.sample_shape(b)))
    elif noise is None:
        noise = family.noise(b, generator)
    noise = torch.as_tensor(noise)
    if tuple(noise.shape) != family.sample_shape(b):
        raise RstrError(f"noise has shape {tuple(noise.shape)}, expected {family.sample_shape(b)}")

    scheduler = family.scheduler_for(schedule)
    timesteps = scheduler.timesteps
    if len(timesteps) != schedule.num_steps:
        raise RstrError(f"scheduler produced {len(timesteps)} timesteps for a {schedule.num_steps}-step schedule")

    x = noise.to(family.device, torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
    with progress_bar(len(timesteps), "sampling", enabled=progress) as bar:
        for i, t in enumerate(timesteps):
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            mt = family.model_timestep(t)
            if schedule.guided[i]:
                out = family.predict(torch.cat([x_in, x_in]), expand_timestep(mt, 2 * b, x.device), both)
                eps = family.combine(out[:b], out[b:], schedule.scale_at(i))
            else:
                out = family.predict(x_in, expand_timestep(mt, b, x.device), cond)
                eps = family.single(out)
            x_next = scheduler.step(eps, t, x, return_dict=False)[0]
            if callback is not None:
                callback(StepInfo(i, float(t), mt, schedule.guided[i], schedule.scales[i], x, eps, x_next))
            x = x_next
            bar.advance()
    return x
