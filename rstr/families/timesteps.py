"""Schedules that carry their own timesteps (Stage-1 searches them): which samplers take them, and how.

* Deterministic DDIM (:class:`~rstr.families.ddim.DDIMAtTimesteps`): integer timesteps in
  ``[0, T)``; the last step sits at its timestep (0 on a searched grid) and steps to the final alpha.
* Flow-matching Euler (:class:`FlowMatchAtTimesteps`): integer timesteps in ``[1, T]``, each the
  sigma ``t / T`` used as given -- no resolution shift, the grid is the schedule's -- and an Euler
  step from the last one to sigma 0.  The stock pipelines start at sigma 1 (pure noise) and shift
  a linear grid towards high noise; a searched grid may start lower and bend the other way.

``T`` is the scheduler's ``num_train_timesteps``.  The export's step plan measures either
scheduler's coefficients as it measures the stock ones (:mod:`rstr.export.plan`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from rstr.errors import ScheduleError
from rstr.families.ddim import DDIMAtTimesteps


class FlowMatchAtTimesteps(FlowMatchEulerDiscreteScheduler):
    """A :class:`FlowMatchEulerDiscreteScheduler` whose ``set_timesteps`` also takes integer ``timesteps``
    in ``[1, T]``: sigmas ``t / T`` as given (no shift), then 0."""

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        if timesteps is None or sigmas is not None:
            super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
            return
        limit = int(self.config.num_train_timesteps)
        ts = [int(t) for t in timesteps]
        if not ts or ts[0] > limit or ts[-1] < 1 or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ScheduleError(f"timesteps {ts} must be strictly decreasing integers in [1, {limit}]")
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.float32, device=device)
        self.sigmas = torch.cat([self.timesteps / limit, torch.zeros(1, device=device)])
        self._step_index = None
        self._begin_index = None


def supports_own_timesteps(scheduler) -> bool:
    """True when a schedule's own timesteps can drive ``scheduler``: deterministic DDIM, or flow-matching Euler
    without stochastic sampling or inverted sigmas."""
    if isinstance(scheduler, DDIMScheduler):
        return not scheduler.config.clip_sample and not scheduler.config.thresholding
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        cfg = scheduler.config
        return not cfg.get("stochastic_sampling", False) and not cfg.get("invert_sigmas", False)
    return False


def last_step_at_zero(scheduler) -> bool:
    """Where a grid of own timesteps ends: on timestep 0 (DDIM, which then steps to the final alpha), or on its
    last sigma above 0, from which the sampler steps to 0 (flow matching)."""
    return isinstance(scheduler, DDIMScheduler)


def at_timesteps(scheduler, timesteps: Sequence[int], device: str | torch.device | None = None):
    """A scheduler with ``scheduler``'s configuration, set to the schedule's own ``timesteps``."""
    if not supports_own_timesteps(scheduler):
        raise ScheduleError(
            f"the schedule carries its own timesteps, which need deterministic DDIM or flow-matching Euler; this "
            f"model uses {type(scheduler).__name__} with this configuration: drop 'timesteps' from the schedule"
        )
    cls = DDIMAtTimesteps if isinstance(scheduler, DDIMScheduler) else FlowMatchAtTimesteps
    own = cls.from_config(scheduler.config)
    own.set_timesteps(timesteps=timesteps, device=device)
    return own
