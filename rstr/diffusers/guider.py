"""A diffusers guider that follows an rstr :class:`~rstr.schedule.GuidanceSchedule`.

diffusers' guiders (``diffusers.guiders``) decide, step by step, how many predictions the
denoiser makes and how they combine; the modular pipelines call ``set_state`` at every step,
run the transformer once per batch that ``prepare_inputs`` returns, and combine with
``__call__``.  :class:`ScheduledGuidance` is classifier-free guidance whose on/off switch and
scale come from the schedule: a guided step returns two batches (conditional, unconditional)
combined as ``u + w_t (c - u)``; an unguided step returns ONE batch, the conditional one, so
the pipeline runs a single transformer pass and uses ``c`` -- rstr's convention.  Family
rules the pipelines apply after the guider (Qwen-Image's per-token norm rescale) stay theirs,
as with diffusers' own :class:`~diffusers.guiders.ClassifierFreeGuidance`.

``ClassifierFreeGuidance`` can switch guidance off only outside one ``[start, stop)``
fraction of the steps, with one scale; a searched schedule needs a per-step pattern and
per-step scales.  The guider saves and loads like diffusers' guiders
(``save_pretrained`` / ``from_pretrained``, ``guider_config.json``) with the whole schedule in
its config, so the schedule's step count and timesteps travel with it: pass
:meth:`ScheduledGuidance.call_kwargs` to the pipeline call (and, for a schedule with its own
timesteps, give the pipeline :func:`rstr.diffusers.pinned_scheduler`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from rstr.errors import ScheduleError
from rstr.schedule import GuidanceSchedule

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState


class ScheduledGuidance(BaseGuidance):
    """Classifier-free guidance on the guided steps of an rstr schedule, at their scales; one pass elsewhere.

    Build it with :meth:`from_schedule` (or ``ScheduledGuidance(schedule=schedule.to_dict())``);
    ``enabled=False`` turns every step into a conditional-only step.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, schedule: dict[str, Any] | None = None, enabled: bool = True):
        super().__init__(start=0.0, stop=1.0, enabled=enabled)
        if schedule is None:
            raise ScheduleError(
                "ScheduledGuidance needs a schedule: use ScheduledGuidance.from_schedule(GuidanceSchedule.load(path))"
            )
        self.schedule = GuidanceSchedule.from_dict(dict(schedule), source="guider config")

    @classmethod
    def from_schedule(cls, schedule: GuidanceSchedule, enabled: bool = True) -> ScheduledGuidance:
        """The guider for ``schedule``."""
        return cls(schedule=schedule.to_dict(), enabled=enabled)

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make a pipeline run the schedule's steps: ``num_inference_steps``.

        A schedule with its own timesteps (``rstr search`` searches them by default) also needs the
        pipeline's scheduler pinned to them: ``pipe.update_components(scheduler=rstr.diffusers.pinned_scheduler(
        scheduler, schedule))``, since the pipelines shift whatever sigmas they are given.
        """
        return {"num_inference_steps": self.schedule.num_steps}

    # ------------------------------------------------------------------ step state
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        if num_inference_steps != self.schedule.num_steps:
            raise ScheduleError(
                f"the pipeline runs {num_inference_steps} steps but the schedule has {self.schedule.num_steps}; "
                f"pass num_inference_steps={self.schedule.num_steps} (guider.call_kwargs())"
            )
        if not 0 <= step < num_inference_steps:
            raise ScheduleError(f"step {step} is outside the schedule's {num_inference_steps} steps")
        super().set_state(step, num_inference_steps, timestep)

    def _guided(self) -> bool:
        if self._step is None:
            raise RuntimeError("ScheduledGuidance used before set_state: the pipeline must set the step first")
        return self._enabled and self.schedule.guided[self._step]

    @property
    def scale(self) -> float | None:
        """The current step's CFG scale, or None on a conditional-only step."""
        return self.schedule.scales[self._step] if self._guided() else None

    @property
    def num_conditions(self) -> int:
        return 2 if self._guided() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # ---------------------------------------------------------- batches and combine
    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        return [self._prepare_batch(data, i, name) for i, name in enumerate(self._input_predictions[: self.num_conditions])]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name)
            for i, name in enumerate(self._input_predictions[: self.num_conditions])
        ]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        scale = self.scale
        if scale is None:
            pred = pred_cond
        elif pred_uncond is None:
            raise RuntimeError("a guided step needs the unconditional prediction: the pipeline ran one batch of two")
        else:
            pred = pred_uncond + scale * (pred_cond - pred_uncond)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
