"""Stage-2: calibrate the model with per-module-rank LoRA so that a sparse schedule matches full CFG.

The teacher is the uncalibrated model under constant CFG at the model's default scale and its
full step count; the student is the model plus a LoRA adapter, sampled under the sparse
schedule.  Both start from the same noise and class, drawn from the CALIBRATION seed range
(disjoint from search and held-out seeds).  The loss compares final samples through the whole
sampling trajectory (:mod:`rstr.calibrate.train`).

Sensitivity (:mod:`rstr.calibrate.sensitivity`): how much of that loss each ``nn.Linear`` inside
a transformer block (:mod:`rstr.calibrate.modules`) can remove, per rank: a short rank-1 probe's
leave-one-out drop, spread over ranks by the module's Fisher eigenvalues (the ablation against
uniform allocation and against a mean-gradient measure: docs/stage2.md).

Allocation (:mod:`rstr.calibrate.allocation`): ``adaptive`` spends the parameter budget on the
rank steps with the largest gain per parameter, ``uniform`` (the ablation) evenly.

Outputs (:mod:`rstr.calibrate.report`, written to a temporary directory, then renamed): the peft
adapter (``adapter_config.json``, ``adapter_model.safetensors``), ``allocation.json``,
``schedule.json``, ``calibration.json``, ``report.md`` and ``calibration.png``.
:func:`apply_adapter` (:mod:`rstr.calibrate.adapter`) merges an adapter into a family
(``W' = W + (alpha/r) B A``, zero extra ops at deployment).  :func:`calibrate`
(:mod:`rstr.calibrate.runner`) checkpoints without pickle (:mod:`rstr.calibrate.checkpoint`).
"""

from rstr.calibrate.adapter import (
    ADAPTER_FILES,
    adapter_sha256,
    apply_adapter,
    check_adapter,
    load_adapter,
    merge_adapter,
)
from rstr.calibrate.runner import CalibrationResult, calibrate
from rstr.calibrate.train import PRESETS, Preset, default_schedule, teacher_schedule

__all__ = [
    "ADAPTER_FILES",
    "PRESETS",
    "CalibrationResult",
    "Preset",
    "adapter_sha256",
    "apply_adapter",
    "calibrate",
    "check_adapter",
    "default_schedule",
    "load_adapter",
    "merge_adapter",
    "teacher_schedule",
]
