"""Stage-2 training: the teacher, the calibration data, the endpoint loss, and the LoRA student and its update.

Loss (our choice): the mean squared difference between the student's and the teacher's *final
samples*, back-propagated through the student's whole sampling trajectory (every step of the
real sampler, :func:`rstr.sampler.sample`).  It is what deployment runs: it sees the student's
own states (no exposure bias), the skipped guidance passes *and* the coarser step grid, with no
per-scheduler algebra.  Teacher samples are computed once per calibration image.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from rstr.errors import RstrError
from rstr.families.base import Conditioning, Family
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule


@dataclass(frozen=True)
class Preset:
    """How much calibration to run: images, batch, iterations and learning rate."""

    pool: int  # calibration images (teacher samples computed once each)
    probe: int  # the first images of the pool, on which the sensitivity is measured
    probe_iterations: int  # training iterations of the rank-1 probe adapter
    validation: int  # calibration-range images never trained on, for the before/after loss
    batch_size: int
    iterations: int
    lr: float
    checkpoint_every: int


PRESETS = {
    "fast": Preset(
        pool=64, probe=32, probe_iterations=10, validation=32, batch_size=8, iterations=40, lr=1e-3, checkpoint_every=10
    ),
    "full": Preset(
        pool=192, probe=48, probe_iterations=30, validation=48, batch_size=12, iterations=120, lr=1e-3, checkpoint_every=20
    ),
}


def teacher_schedule(family: Family) -> GuidanceSchedule:
    """Constant CFG at the model's default scale and full step count: what the student must match."""
    return family.constant_cfg()


def default_schedule(family: Family) -> GuidanceSchedule:
    """A hand-made sparse schedule: a third of the steps, guidance at the default scale on the first 60%.

    For the reference model (25 steps) that is 8 steps, 5 guided: 13 passes, 26% of constant CFG.
    """
    n = max(1, round(family.default_steps / 3))
    return GuidanceSchedule.first_k(
        family.default_scale, n, round(0.6 * n), family=family.name, sampler=family.sampler, default_steps=family.default_steps
    )


@dataclass
class CalibrationData:
    """Noise, conditioning and the teacher's final samples for a set of calibration images."""

    noise: torch.Tensor
    cond: Conditioning
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.noise)

    def take(self, idx: torch.Tensor | slice) -> CalibrationData:
        return CalibrationData(self.noise[idx], {k: v[idx] for k, v in self.cond.items()}, self.target[idx])

    def to(self, device: torch.device) -> CalibrationData:
        return CalibrationData(self.noise.to(device), {k: v.to(device) for k, v in self.cond.items()}, self.target.to(device))


def seed_conditioning(family: Family, seeds: range) -> tuple[torch.Tensor, Conditioning]:
    """Noise and conditioning for seeds, the way :func:`rstr.evaluate.evaluate` draws them (class ``i % num_classes``).

    The unconditional input is the family's own (null class, or the class table's negative prompt).
    """
    from rstr.evaluate import noise_for_seeds

    if family.num_classes is None:
        raise RstrError(
            f"calibration images are drawn per class; this {family.name} model has neither class labels nor a "
            "prompt set: give prompts with --prompts FILE"
        )
    cond, _ = family.conditioning_for(torch.arange(len(seeds)) % family.num_classes)
    return noise_for_seeds(family, seeds).to(family.device), cond


@torch.no_grad()
def teacher_data(
    family: Family, teacher: GuidanceSchedule, noise: torch.Tensor, cond: Conditioning, batch_size: int = 256
) -> CalibrationData:
    """Run the teacher once on every image and keep its final samples as targets."""
    outs = []
    for lo in range(0, len(noise), batch_size):
        part = {k: v[lo : lo + batch_size] for k, v in cond.items()}
        outs.append(sample(family, teacher, part, noise=noise[lo : lo + batch_size]))
    return CalibrationData(noise, cond, torch.cat(outs))


def endpoint_loss(family: Family, schedule: GuidanceSchedule, data: CalibrationData) -> torch.Tensor:
    """MSE between the student's final samples under ``schedule`` and the teacher's, with gradients.

    Runs the real sampler loop; ``inspect.unwrap(sample)`` is :func:`rstr.sampler.sample` without its
    ``torch.no_grad`` decorator, so gradients flow through every step.
    """
    final = inspect.unwrap(sample)(family, schedule, data.cond, noise=data.noise)
    return nn.functional.mse_loss(final, data.target)


@torch.no_grad()
def mean_loss(family: Family, schedule: GuidanceSchedule, data: CalibrationData, batch_size: int = 256) -> float:
    """:func:`endpoint_loss` over ``data`` without gradients, averaged per image."""
    total = 0.0
    for lo in range(0, len(data), batch_size):
        part = data.take(slice(lo, lo + batch_size))
        total += float(endpoint_loss(family, schedule, part)) * len(part)
    return total / len(data)


def lora_student(family: Family, ranks: dict[str, int], seed: int, lr: float):
    """A copy of ``family`` with a fresh peft LoRA of ``ranks`` (initialised from ``seed``): (student, peft model,
    trainable parameters, AdamW).  The probe and the calibration start the same way."""
    from peft import get_peft_model

    student = copy.deepcopy(family)
    torch.manual_seed(seed)
    peft_model = get_peft_model(student.transformer, lora_config(ranks))
    params = [q for q in peft_model.parameters() if q.requires_grad]
    return student, peft_model, params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_step(
    student: Family, schedule: GuidanceSchedule, data: CalibrationData, batch_size: int, params: list, opt, gen: torch.Generator
) -> torch.Tensor:
    """One update: a random batch of ``data`` (drawn with ``gen``), the endpoint loss, a clipped AdamW step; the loss."""
    idx = torch.randperm(len(data), generator=gen)[:batch_size]
    loss = endpoint_loss(student, schedule, data.take(idx.to(data.noise.device)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def lora_config(ranks: dict[str, int]):
    """A peft ``LoraConfig`` with one rank (and ``alpha = rank``, scale 1) per adapted module."""
    from peft import LoraConfig

    used = {name: r for name, r in ranks.items() if r > 0}
    first = next(iter(used.values()))
    return LoraConfig(
        r=first,
        lora_alpha=first,
        target_modules=sorted(used),
        rank_pattern={re.escape(name): r for name, r in used.items()},
        alpha_pattern={re.escape(name): r for name, r in used.items()},
        lora_dropout=0.0,
        bias="none",
    )
