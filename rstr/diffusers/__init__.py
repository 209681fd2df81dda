"""rstr inside stock diffusers: searched schedules, Stage-2 adapters and exported pipelines.

* :class:`ScheduledGuidance` -- a guider for diffusers' guider API (``diffusers.guiders``),
  for the modular pipelines that take one (Qwen-Image in diffusers 0.42): per-step guidance
  and scale from the schedule, one pass on unguided steps; saves and loads like diffusers'
  guiders.
* :func:`apply` / :func:`remove` -- make a classic ``DiTPipeline``, ``PixArtAlphaPipeline``,
  ``FluxPipeline`` or ``QwenImagePipeline`` follow a schedule (and an adapter) in place.
* :func:`pinned_scheduler` -- a scheduler that runs a schedule's own timesteps, for pipelines
  that cannot pass them (the modular ones, with the guider).
* :func:`export_lora` -- an rstr adapter in diffusers' LoRA layout, for ``pipe.load_lora_weights``.
* :func:`export_pipeline` -- a diffusers pipeline directory with the adapter fused and the
  schedule as a guider config (``rstr export-diffusers``).

Inside this package ``import diffusers`` is the library; rstr's integration is ``rstr.diffusers``.
"""

from rstr.diffusers.export import PixelDecoder, export_lora, export_pipeline, load_pipeline
from rstr.diffusers.guider import ScheduledGuidance
from rstr.diffusers.pipelines import PIPELINE_SCALE, Applied, apply, pinned_scheduler, remove

__all__ = [
    "PIPELINE_SCALE",
    "Applied",
    "PixelDecoder",
    "ScheduledGuidance",
    "apply",
    "export_lora",
    "export_pipeline",
    "load_pipeline",
    "pinned_scheduler",
    "remove",
]
