"""The static step plan: every per-step constant the runtime needs, measured at export.

For each step the plan records the scheduler timestep, the value the transformer receives,
whether the step is guided (batch 2B) or not (batch B), its scale, and the scheduler update as
a linear map of the current sample and model output and of the last ``k`` ones:
``x_next = sum_d coef_sample[d] * x_{i-d} + coef_eps[d] * eps_{i-d}`` (``k = 0`` for DDIM and
flow-matching Euler, ``k >= 1`` for linear multistep solvers such as DPM-Solver++ 2M or UniPC,
whose internal history -- x0 predictions, corrected samples -- is itself linear in those).

The coefficients are *measured* from the model's own scheduler rather than re-derived per
scheduler class, so final-step and lower-order rules come out as the scheduler applies them:

1. Basis trajectories, each on a deep copy of the scheduler: from ``x_0 = 1`` with every model
   output 0, and for each step ``j`` from the all-zero state reached at ``j`` with
   ``eps_j = 1`` then 0 for :data:`WINDOW` steps.  Every response must be one value repeated
   (spread measured in float64 relative to its size: float32 rounding of a coefficient of 8.6
   is ~1e-6), and the all-zero trajectory must stay 0.  This gives each ``x_{i+1}`` as
   ``A_i x_0 + sum_j B_ij eps_j``.
2. Per step, the shortest history ``k <= MAX_HISTORY`` whose coefficients reproduce that row
   (least squares in float64, residual below float32 rounding).
3. A check on random inputs over a whole trajectory: the stock scheduler steps random samples and
   model outputs, and each of its outputs must equal the map applied to its own past.

A scheduler whose update is not such a map (DDIM with eta > 0 or clipping, thresholding, SDE
variants, a history past :data:`MAX_HISTORY`) is refused with the reason.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from rstr.engines.manifest import Plan, Step

from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule

MAX_HISTORY = 3  # past (sample, model output) pairs a step may use: UniPC of order 3 needs 3
WINDOW = 2 * (MAX_HISTORY + 1)  # steps measured after each unit model output: over-determines the fit
FIT_TOLERANCE = 1e-5  # relative residual of the per-step fit (coefficients carry float32 rounding)
CHECK_TOLERANCE = 1e-5  # relative error of the map on random inputs, one step at a time
FIX = "use DDIM (eta=0, clip_sample=False), flow-matching Euler, DPM-Solver++ (multistep, no thresholding) or UniPC"


def _not_constant(t: torch.Tensor) -> bool:
    """True when ``t`` is not one value repeated, beyond float32 rounding of its size."""
    return float(t.double().std()) > 1e-6 * max(1.0, float(t.abs().max()))


class _Probe:
    """Steps deep copies of a scheduler on constant tensors and reads back the coefficient."""

    def __init__(self, scheduler, shape: tuple[int, ...]):
        self.scheduler, self.shape, self.name = scheduler, shape, type(scheduler).__name__
        self.timesteps = list(scheduler.timesteps)

    def refuse(self, i: int, why: str) -> RstrError:
        return RstrError(f"{self.name} update at step {i} {why}; {FIX}")

    def run(self, scheduler, start: int, x: float, eps: dict[int, float], stop: int) -> list[float]:
        """Step ``scheduler`` (copied) from step ``start`` on constant inputs; each step's output as one number."""
        s = copy.deepcopy(scheduler)
        xt = torch.full(self.shape, x)
        out = []
        for i in range(start, stop):
            e = torch.full(self.shape, eps.get(i, 0.0))
            xt = s.step(e, self.timesteps[i], xt, return_dict=False)[0]
            if _not_constant(xt):
                raise self.refuse(i, "is not a fixed linear map of (sample, eps): constant inputs give a varying output")
            out.append(float(xt.double().mean()))
        return out

    def responses(self) -> tuple[np.ndarray, np.ndarray]:
        """``A[i]``, ``B[i, j]``: ``x_{i+1} = A_i x_0 + sum_j B_ij eps_j``; ``B`` is NaN past :data:`WINDOW`."""
        n = len(self.timesteps)
        states, s, zero = [], copy.deepcopy(self.scheduler), torch.zeros(self.shape)
        for i in range(n):
            states.append(copy.deepcopy(s))
            if s.step(zero, self.timesteps[i], zero, return_dict=False)[0].abs().max() > 1e-6:
                raise self.refuse(i, "is not linear in (sample, eps): zero inputs give a non-zero output")
        a = np.array(self.run(self.scheduler, 0, 1.0, {}, n))
        b = np.full((n, n), np.nan)
        for j in range(n):
            stop = min(n, j + WINDOW + 1)
            b[j:stop, j] = self.run(states[j], j, 0.0, {j: 1.0}, stop)
        return a, b


def _fit(i: int, a: np.ndarray, b: np.ndarray) -> tuple[list[float], list[float]] | None:
    """The shortest history whose coefficients give row ``i`` of ``(a, b)`` from the rows before it."""
    js = range(max(0, i - WINDOW), i + 1)  # the model outputs whose responses are measured for every row used

    def sample_row(m: int) -> np.ndarray:  # x_m over (x_0, eps_j for j in js)
        if m == 0:
            return np.r_[1.0, np.zeros(len(js))]
        return np.r_[a[m - 1], [b[m - 1, j] if j < m else 0.0 for j in js]]

    def eps_row(m: int) -> np.ndarray:
        return np.r_[0.0, [1.0 if j == m else 0.0 for j in js]]

    target = sample_row(i + 1)
    for k in range(min(i, MAX_HISTORY) + 1):
        cols = np.stack([row(i - d) for d in range(k + 1) for row in (sample_row, eps_row)], axis=1)
        coefs = np.linalg.lstsq(cols, target, rcond=None)[0]
        if np.abs(cols @ coefs - target).max() <= FIT_TOLERANCE * max(1.0, np.abs(target).max()):
            return coefs[0::2].tolist(), coefs[1::2].tolist()
    return None


def _check(probe: _Probe, coefs: list[tuple[list[float], list[float]]]) -> None:
    """The map against the stock scheduler on random samples and model outputs, one step at a time."""
    g = torch.Generator().manual_seed(0)
    s = copy.deepcopy(probe.scheduler)
    xs = [torch.randn(probe.shape, generator=g)]
    eps: list[torch.Tensor] = []
    for i, t in enumerate(probe.timesteps):
        eps.append(torch.randn(probe.shape, generator=g))
        expected = s.step(eps[i], t, xs[i], return_dict=False)[0]
        cs, ce = coefs[i]
        got = sum(cs[d] * xs[i - d].double() + ce[d] * eps[i - d].double() for d in range(len(cs)))
        if (expected.double() - got).abs().max() > CHECK_TOLERANCE * max(1.0, float(expected.abs().max())):
            raise probe.refuse(
                i,
                f"is not linear in the sample and model output (and their last {MAX_HISTORY}) on random inputs "
                "(clipping, thresholding or noise injection?)",
            )
        xs.append(expected)


def measure_updates(scheduler, shape: tuple[int, ...]) -> list[tuple[list[float], list[float]]]:
    """Per step, the coefficients of ``x_{i-d}`` and ``eps_{i-d}`` (``d = 0..k``) of the scheduler's update."""
    probe = _Probe(scheduler, shape)
    a, b = probe.responses()
    coefs = []
    for i in range(len(probe.timesteps)):
        fit = _fit(i, a, b)
        if fit is None:
            raise probe.refuse(i, f"is not a linear map of the sample and model output and their last {MAX_HISTORY}")
        coefs.append(fit)
    _check(probe, coefs)
    return coefs


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
    one = torch.ones(shape)
    for t in scheduler.timesteps:
        if hasattr(scheduler, "scale_model_input") and not torch.equal(scheduler.scale_model_input(one, t), one):
            raise RstrError(f"{type(scheduler).__name__} scales the model input; {FIX}")
    steps = []
    for i, (t, (cs, ce)) in enumerate(zip(scheduler.timesteps, measure_updates(scheduler, shape))):
        steps.append(
            Step(
                index=i,
                timestep=float(t),
                model_timestep=family.model_timestep(t),
                guided=schedule.guided[i],
                scale=schedule.scales[i],
                coef_sample=cs[0],
                coef_eps=ce[0],
                past_sample=tuple(cs[1:]),
                past_eps=tuple(ce[1:]),
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
