"""The static step plan: every per-step constant the runtime needs, measured at export.

For each step the plan records the scheduler timestep, the value the transformer receives,
whether the step is guided (batch 2B) or not (batch B), its scale, and the scheduler update
as two coefficients: ``x_next = coef_sample * x + coef_eps * eps``.

The coefficients are *measured* from the model's own scheduler rather than re-derived per
scheduler class: for each step a copy of the scheduler (state included) is stepped on
``(x=0, eps=0)``, ``(1, 0)`` and ``(0, 1)``, and the affine fit is checked on random inputs.
The responses to ``(1, 0)`` and ``(0, 1)`` must be constant tensors: their spread is measured
in float64 and relative to their size (a coefficient of 8.6 in float32 carries ~1e-6 of
rounding, which an absolute bound would take for a non-affine update).
A scheduler whose update is not affine in ``(x, eps)`` (DDIM with eta > 0 or clipping,
multistep solvers with history) is refused with the reason.
"""

from __future__ import annotations

import copy

import torch
from rstr.engines.manifest import Plan, Step

from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule


def _step(scheduler, t, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return copy.deepcopy(scheduler).step(eps, t, x, return_dict=False)[0]


def _not_constant(t: torch.Tensor) -> bool:
    """True when ``t`` is not one value repeated, beyond float32 rounding of its size."""
    return float(t.double().std()) > 1e-6 * max(1.0, float(t.abs().max()))


def build_plan(family: Family, schedule: GuidanceSchedule, batch: int) -> Plan:
    """The step plan of ``schedule`` at batch ``batch`` (the manifest's ``plan`` section)."""
    schedule.check_fits(family.name)
    limit = int(family.scheduler.config.get("num_train_timesteps", 1000))
    if schedule.num_steps > limit:
        raise RstrError(
            f"schedule has {schedule.num_steps} steps, more than the model's {limit} training timesteps; use fewer steps"
        )
    scheduler = family.scheduler_for(schedule)
    shape = family.sample_shape(1)
    g = torch.Generator().manual_seed(0)
    steps = []
    for i, t in enumerate(scheduler.timesteps):
        zero = torch.zeros(shape)
        one = torch.ones(shape)
        if hasattr(scheduler, "scale_model_input") and not torch.equal(scheduler.scale_model_input(one, t), one):
            raise RstrError(f"{type(scheduler).__name__} scales the model input; the plan supports DDIM and flow-matching Euler")
        base = _step(scheduler, t, zero, zero)
        a = _step(scheduler, t, one, zero) - base
        b = _step(scheduler, t, zero, one) - base
        if base.abs().max() > 1e-6 or _not_constant(a) or _not_constant(b):
            raise RstrError(
                f"{type(scheduler).__name__} update at step {i} is not a fixed affine map of (sample, eps); "
                "use DDIM (eta=0, clip_sample=False) or flow-matching Euler"
            )
        coef_sample, coef_eps = float(a.mean()), float(b.mean())
        x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        expected = _step(scheduler, t, x, eps)
        got = coef_sample * x + coef_eps * eps
        if (expected - got).abs().max() > 1e-5 * max(1.0, float(expected.abs().max())):
            raise RstrError(
                f"{type(scheduler).__name__} update at step {i} is not affine in (sample, eps) "
                "(clipping, thresholding or multistep history?); use DDIM (eta=0, clip_sample=False) or flow-matching Euler"
            )
        scheduler.step(eps, t, x, return_dict=False)  # advance stateful schedulers exactly as sampling does
        steps.append(
            Step(
                index=i,
                timestep=float(t),
                model_timestep=family.model_timestep(t),
                guided=schedule.guided[i],
                scale=schedule.scales[i],
                coef_sample=coef_sample,
                coef_eps=coef_eps,
            )
        )
    return Plan(
        batch=batch,
        init_noise_sigma=float(getattr(scheduler, "init_noise_sigma", 1.0)),
        default_steps=schedule.default_steps,
        passes_per_image=schedule.passes_per_image,
        compute_fraction=schedule.compute_fraction,
        sampler=schedule.sampler,
        steps=tuple(steps),
    )
