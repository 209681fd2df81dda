"""Stage-2 sensitivity: how much of the calibration loss each module's LoRA can remove, per rank.

Measured on the probe images (the first ``preset.probe`` of the pool) in two cheap parts:

- *How much a module is worth* is measured, not extrapolated from a gradient: a rank-1 LoRA on
  every module is trained jointly for ``preset.probe_iterations`` steps (the real optimiser, lr
  and batch), then each module's adapter is switched off in turn (``B = 0``); the rise in the
  probe loss is the module's *drop* at rank 1.  This accounts for what a squared gradient at
  the uncalibrated model does not: LoRA starts at ``B = 0`` with a random ``A`` (it does not
  step along the top singular vector of the gradient), Adam moves every parameter at about
  ``lr`` per step whatever its gradient's scale, and the modules compete for the same error.
- *How the worth spreads over ranks* follows an empirical Fisher of the weight: with ``G_b``
  the loss gradient w.r.t. the weight on group ``b`` of ``FISHER_IMAGES`` probe images, the
  eigenvalues ``l_1 >= l_2 >= ...`` of ``sum_b G_b G_b^T`` (output side) or ``sum_b G_b^T G_b``
  (input side), whichever side is smaller (``min(in, out)`` eigenvalues, one per possible
  rank; the side that bounds the update's rank).  Unlike the mean gradient (nearly rank 1:
  one step's direction), it spans the directions that differ from image to image, which a
  higher-rank adapter needs to fit them all.

A module's gain at rank ``r`` is ``drop * (l_1 + ... + l_r) / l_1`` (:func:`rstr.calibrate.allocation.gain`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rstr.calibrate.allocation import TargetModule
from rstr.calibrate.train import CalibrationData, Preset, endpoint_loss, lora_student, mean_loss, train_step
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule

FISHER_IMAGES = 4  # images per gradient sample of the sensitivity's Fisher estimate


def measure_sensitivity(
    family: Family, schedule: GuidanceSchedule, data: CalibrationData, modules: Sequence[TargetModule], p: Preset, seed: int
) -> dict[str, list[float]]:
    """Each module's loss drop per added rank: the probe's rank-1 drop, spread over ranks like its Fisher eigenvalues.

    A module that does not reach the output (no gradient: e.g. the text stream's last projections in
    a dual-stream block whose text output nothing reads) gets an empty list: no rank buys anything."""
    drops = probe_drops(family, schedule, data, modules, p, seed)
    spectra = gradient_spectra(family, schedule, data, modules)
    return {name: [drops[name] * s / (spectrum[0] or 1.0) for s in spectrum] for name, spectrum in spectra.items()}


def probe_drops(
    family: Family, schedule: GuidanceSchedule, data: CalibrationData, modules: Sequence[TargetModule], p: Preset, seed: int
) -> dict[str, float]:
    """Loss each module's rank-1 LoRA is worth after a short joint probe training (leave-one-out, >= 0)."""
    probe, _, params, opt = lora_student(family, {m.name: 1 for m in modules}, seed, p.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(p.probe_iterations):
        train_step(probe, schedule, data, p.batch_size, params, opt, gen)
    trained = mean_loss(probe, schedule, data)
    drops = {}
    with torch.no_grad():
        for m in modules:
            b = probe.transformer.get_submodule(m.name).lora_B["default"].weight
            saved = b.clone()
            b.zero_()
            drops[m.name] = max(0.0, mean_loss(probe, schedule, data) - trained)
            b.copy_(saved)
    return drops


def gradient_spectra(
    family: Family, schedule: GuidanceSchedule, data: CalibrationData, modules: Sequence[TargetModule]
) -> dict[str, list[float]]:
    """Eigenvalues (descending) of each module's ``sum_b G_b G_b^T`` or ``sum_b G_b^T G_b``, the smaller, over image groups;
    an empty list for a module whose weight gets no gradient."""
    weights = {m.name: family.transformer.get_submodule(m.name).weight for m in modules}
    grams: dict[str, torch.Tensor] = {}
    saved = {name: w.requires_grad for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for lo in range(0, len(data), FISHER_IMAGES):
            loss = endpoint_loss(family, schedule, data.take(slice(lo, lo + FISHER_IMAGES)))
            for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values()), allow_unused=True)):
                if g is None:
                    continue
                g = g.double()
                gg = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g  # output side if out <= in, else input side
                grams[name] = grams[name] + gg if name in grams else gg
    finally:
        for name, w in weights.items():
            w.requires_grad_(saved[name])
    return {name: torch.linalg.eigvalsh(grams[name]).flip(0).clamp_min(0).tolist() if name in grams else [] for name in weights}
