"""DDIM on an explicit list of timesteps, for schedules that carry their own (Stage-1 searches them).

diffusers' :class:`~diffusers.DDIMScheduler` only spaces timesteps itself (``leading``,
``trailing``, ``linspace``) and steps from ``t`` to ``t - num_train_timesteps // num_steps``.
:class:`DDIMAtTimesteps` takes any strictly decreasing list and steps from each timestep to the
next one (the last to the scheduler's final alpha), with DDIM's deterministic update
(``eta = 0``): ``x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps``.  On the stock list it
reproduces ``DDIMScheduler`` (tested), and the export's step plan measures its coefficients the
same way as the stock scheduler's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from rstr.errors import ScheduleError


class DDIMAtTimesteps(DDIMScheduler):
    """A :class:`DDIMScheduler` whose ``set_timesteps`` also accepts ``timesteps=[...]``."""

    _custom: list[int] | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        if timesteps is None:
            self._custom = None
            super().set_timesteps(num_inference_steps, device=device)
            return
        ts = [int(t) for t in timesteps]
        limit = self.config.num_train_timesteps
        if not ts or ts[0] >= limit or ts[-1] < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ScheduleError(f"timesteps {ts} must be strictly decreasing integers in [0, {limit - 1}]")
        self._custom = ts
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after ``timestep`` in the list; -1 (the final alpha) after the last."""
        if self._custom is None:
            return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps
        i = self._custom.index(int(timestep))
        return self._custom[i + 1] if i + 1 < len(self._custom) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        return_dict: bool = True,
        **kwargs,
    ) -> DDIMSchedulerOutput | tuple:
        if self._custom is None:
            return super().step(model_output, timestep, sample, eta=eta, return_dict=return_dict, **kwargs)
        if eta != 0.0 or self.config.clip_sample or self.config.thresholding:
            raise ScheduleError("own timesteps support deterministic DDIM only (eta=0, no clipping or thresholding)")
        t, prev = int(timestep), self.previous_timestep(timestep)
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0, eps = (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5, model_output
        elif kind == "sample":
            x0, eps = model_output, (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5
        elif kind == "v_prediction":
            x0 = alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
            eps = alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        else:
            raise ScheduleError(f"prediction_type {kind!r} is not supported with own timesteps")
        prev_sample = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
