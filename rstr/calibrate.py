"""Stage-2: calibrate the model with per-module-rank LoRA so that a sparse schedule matches full CFG.

The teacher is the uncalibrated model under constant CFG at the model's default scale and its
full step count; the student is the model plus a LoRA adapter, sampled under the sparse
schedule.  Both start from the same noise and class, drawn from the CALIBRATION seed range
(disjoint from search and held-out seeds).

Loss (our choice): the mean squared difference between the student's and the teacher's *final
samples*, back-propagated through the student's whole sampling trajectory (every step of the
real sampler, :func:`rstr.sampler.sample`).  It is what deployment runs: it sees the student's
own states (no exposure bias), the skipped guidance passes *and* the coarser step grid, with no
per-scheduler algebra.  Teacher samples are computed once per calibration image.

Sensitivity (our choice): how much of that loss each ``nn.Linear`` inside a transformer block
can remove, per rank, measured on the probe images (the first ``preset.probe`` of the pool) in
two cheap parts:

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

A module's gain at rank ``r`` is ``drop * (l_1 + ... + l_r) / l_1``, and its sensitivity the
gain at its full rank.  On the reference model (docs/stage2/ablation.md, 3 seeds) adaptive
then beats uniform by 0.22 FD at a 0.25% budget and on every seed at 1% (by 0.04 on the mean,
inside the seed spread); the mean-gradient measure it replaces tied with uniform at 1%.

Allocation: ranks come from ``RANKS`` (capped at ``min(in, out)``) and a LoRA of rank ``r`` on
``Linear(in, out)`` costs ``r * (in + out)`` parameters.  ``adaptive`` greedily takes the rank
step with the largest gain per added parameter that still fits the budget; ``uniform`` (the
ablation) raises every module to the same rank before any goes higher, block by block in turn,
so the budget is spread evenly over depth and layer kinds.

Outputs (written to a temporary directory, then renamed): the peft adapter
(``adapter_config.json``, ``adapter_model.safetensors``), ``allocation.json``, ``schedule.json``,
``calibration.json``, ``report.md`` and ``calibration.png``.  :func:`apply_adapter` merges an
adapter into a family (``W' = W + (alpha/r) B A``, zero extra ops at deployment).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from rstr._io import atomic_dir, atomic_path, write_json
from rstr.errors import RstrError
from rstr.families.base import Conditioning, Family
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

ALLOCATION_FORMAT = "rstr.allocation/1"
CALIBRATION_FORMAT = "rstr.calibration/1"
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # allowed positive ranks; 0 = no adapter
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
Method = Literal["adaptive", "uniform"]
QUALITY_CHECK_IMAGES = 500  # the last calibration-range seeds: quality_check's, never trained on
FISHER_IMAGES = 4  # images per gradient sample of the sensitivity's Fisher estimate

# Layer kinds, first match wins (reported per kind; the allocation itself is per module).
_KINDS = (
    ("emb", r"(^|\.)(emb|timestep_embedder|time_text_embed|class_embedder)\."),
    ("adanorm", r"(^|\.)norm[^.]*\."),
    ("attn.q", r"(to_q|q_proj)$"),
    ("attn.k", r"(to_k|k_proj)$"),
    ("attn.v", r"(to_v|v_proj)$"),
    ("attn.out", r"(to_out|to_add_out|o_proj|out_proj)(\.\d+)?$"),
    ("ff", r"(^|\.)(ff|ff_context|mlp|proj_mlp)(\.|$)"),
)


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
    "fast": Preset(pool=64, probe=32, probe_iterations=10, validation=32, batch_size=8, iterations=40, lr=1e-3, checkpoint_every=10),
    "full": Preset(pool=192, probe=48, probe_iterations=30, validation=48, batch_size=12, iterations=120, lr=1e-3, checkpoint_every=20),
}


# ----------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class TargetModule:
    """One ``nn.Linear`` inside a transformer block: what a LoRA can attach to."""

    name: str  # qualified name in the transformer
    block: str
    kind: str
    in_features: int
    out_features: int

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def cost(self, rank: int) -> int:
        """LoRA parameters at ``rank``: ``A`` is ``rank x in``, ``B`` is ``out x rank``."""
        return rank * (self.in_features + self.out_features)

    def ranks(self) -> list[int]:
        """The allowed ranks of this module, 0 first."""
        return [0, *(r for r in RANKS if r <= self.max_rank)]


def module_kind(name: str) -> str:
    """The layer kind of a module name relative to its block (``attn.q``, ``ff``, ``adanorm``, ...)."""
    for kind, pattern in _KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def target_modules(family: Family) -> list[TargetModule]:
    """Every ``nn.Linear`` inside the family's transformer blocks, in depth order."""
    out = []
    for block_name, block in family.blocks():
        for sub, m in block.named_modules():
            if isinstance(m, nn.Linear):
                out.append(TargetModule(f"{block_name}.{sub}", block_name, module_kind(sub), m.in_features, m.out_features))
    if not out:
        raise RstrError(f"the {family.name} transformer has no linear layers inside its blocks; nothing to calibrate")
    return out


def transformer_params(family: Family) -> int:
    return sum(p.numel() for p in family.transformer.parameters())


# --------------------------------------------------------------------------- schedules
def teacher_schedule(family: Family) -> GuidanceSchedule:
    """Constant CFG at the model's default scale and full step count: what the student must match."""
    scale = float(family.meta.get("default_scale") or 4.0)
    return GuidanceSchedule.constant(scale, family.default_steps, family=family.name, sampler=family.sampler, default_steps=family.default_steps)


def default_schedule(family: Family) -> GuidanceSchedule:
    """A hand-made sparse schedule: a third of the steps, guidance at the default scale on the first 60%.

    For the reference model (25 steps) that is 8 steps, 5 guided: 13 passes, 26% of constant CFG.
    """
    scale = float(family.meta.get("default_scale") or 4.0)
    n = max(1, round(family.default_steps / 3))
    return GuidanceSchedule.first_k(scale, n, round(0.6 * n), family=family.name, sampler=family.sampler, default_steps=family.default_steps)


# -------------------------------------------------------------------------------- data
@dataclass
class CalibrationData:
    """Noise, conditioning and the teacher's final samples for a set of calibration images."""

    noise: torch.Tensor
    cond: Conditioning
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.noise)

    def take(self, idx: torch.Tensor | slice) -> "CalibrationData":
        return CalibrationData(self.noise[idx], {k: v[idx] for k, v in self.cond.items()}, self.target[idx])

    def to(self, device: torch.device) -> "CalibrationData":
        return CalibrationData(self.noise.to(device), {k: v.to(device) for k, v in self.cond.items()}, self.target.to(device))


def class_conditioning(family: Family, seeds: range) -> tuple[torch.Tensor, Conditioning]:
    """Noise and class labels for seeds, the way :func:`rstr.evaluate.evaluate` draws them."""
    from rstr.evaluate import noise_for_seeds

    num_classes = getattr(family, "num_classes", None)
    if num_classes is None:
        raise RstrError(f"calibration images come from class labels; the {family.name} family needs prompts: use calibrate(..., data=)")
    labels = torch.arange(len(seeds)) % num_classes
    return noise_for_seeds(family, seeds).to(family.device), {"class_labels": labels.to(family.device)}


@torch.no_grad()
def teacher_data(family: Family, teacher: GuidanceSchedule, noise: torch.Tensor, cond: Conditioning, batch_size: int = 256) -> CalibrationData:
    """Run the teacher once on every image and keep its final samples as targets."""
    outs = []
    for lo in range(0, len(noise), batch_size):
        part = {k: v[lo : lo + batch_size] for k, v in cond.items()}
        outs.append(sample(family, teacher, part, noise=noise[lo : lo + batch_size]))
    return CalibrationData(noise, cond, torch.cat(outs))


def endpoint_loss(family: Family, schedule: GuidanceSchedule, data: CalibrationData) -> torch.Tensor:
    """MSE between the student's final samples under ``schedule`` and the teacher's, with gradients.

    Runs the real sampler loop; ``sample.__wrapped__`` is :func:`rstr.sampler.sample` without its
    ``torch.no_grad`` decorator, so gradients flow through every step.
    """
    final = sample.__wrapped__(family, schedule, data.cond, noise=data.noise)
    return nn.functional.mse_loss(final, data.target)


@torch.no_grad()
def mean_loss(family: Family, schedule: GuidanceSchedule, data: CalibrationData, batch_size: int = 256) -> float:
    """:func:`endpoint_loss` over ``data`` without gradients, averaged per image."""
    total = 0.0
    for lo in range(0, len(data), batch_size):
        part = data.take(slice(lo, lo + batch_size))
        total += float(endpoint_loss(family, schedule, part)) * len(part)
    return total / len(data)


# ------------------------------------------------------------------------- sensitivity
def measure_sensitivity(
    family: Family, schedule: GuidanceSchedule, data: CalibrationData, modules: Sequence[TargetModule], p: Preset, seed: int
) -> dict[str, list[float]]:
    """Each module's loss drop per added rank: the probe's rank-1 drop, spread over ranks like its Fisher eigenvalues."""
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


def lora_student(family: Family, ranks: dict[str, int], seed: int, lr: float):
    """A copy of ``family`` with a fresh peft LoRA of ``ranks`` (initialised from ``seed``): (student, peft model,
    trainable parameters, AdamW).  The probe and the calibration start the same way."""
    from peft import get_peft_model

    student = copy.deepcopy(family)
    torch.manual_seed(seed)
    peft_model = get_peft_model(student.transformer, lora_config(ranks))
    params = [q for q in peft_model.parameters() if q.requires_grad]
    return student, peft_model, params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_step(student: Family, schedule: GuidanceSchedule, data: CalibrationData, batch_size: int, params: list, opt,
               gen: torch.Generator) -> torch.Tensor:
    """One update: a random batch of ``data`` (drawn with ``gen``), the endpoint loss, a clipped AdamW step; the loss."""
    idx = torch.randperm(len(data), generator=gen)[:batch_size]
    loss = endpoint_loss(student, schedule, data.take(idx.to(data.noise.device)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def gradient_spectra(
    family: Family, schedule: GuidanceSchedule, data: CalibrationData, modules: Sequence[TargetModule]
) -> dict[str, list[float]]:
    """Eigenvalues (descending) of each module's ``sum_b G_b G_b^T`` or ``sum_b G_b^T G_b``, the smaller, over image groups."""
    weights = {m.name: family.transformer.get_submodule(m.name).weight for m in modules}
    grams: dict[str, torch.Tensor] = {}
    saved = {name: w.requires_grad for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for lo in range(0, len(data), FISHER_IMAGES):
            loss = endpoint_loss(family, schedule, data.take(slice(lo, lo + FISHER_IMAGES)))
            for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
                g = g.double()
                gg = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g  # output side if out <= in, else input side
                grams[name] = grams[name] + gg if name in grams else gg
    finally:
        for name, w in weights.items():
            w.requires_grad_(saved[name])
    return {name: torch.linalg.eigvalsh(gg).flip(0).clamp_min(0).tolist() for name, gg in grams.items()}


def gain(spectrum: Sequence[float], rank: int) -> float:
    """Loss drop a rank-``rank`` adapter can buy: the sum of the first ``rank`` per-rank drops of :func:`measure_sensitivity`."""
    return float(sum(spectrum[:rank]))


# -------------------------------------------------------------------------- allocation
def allocate(
    modules: Sequence[TargetModule], budget_params: int, method: Method, spectra: dict[str, list[float]] | None = None
) -> dict[str, int]:
    """Ranks per module (0 = no adapter) whose LoRA parameters fit ``budget_params``.

    ``adaptive`` takes, step by step, the next allowed rank of the module with the largest
    gain per added parameter; ``uniform`` raises the lowest ranks first, block by block in turn
    (cheapest layer first inside a block), ignoring sensitivity.
    """
    check_budget(modules, budget_params)
    if method == "adaptive" and spectra is None:
        raise ValueError("adaptive allocation needs the sensitivity spectra")
    order = _round_robin(modules)
    ranks = {m.name: 0 for m in modules}
    spent = 0
    while True:
        best, best_key = None, None
        for m in modules:
            allowed = m.ranks()
            i = allowed.index(ranks[m.name])
            if i + 1 == len(allowed):
                continue
            cur, nxt = allowed[i], allowed[i + 1]
            cost = m.cost(nxt) - m.cost(cur)
            if spent + cost > budget_params:
                continue
            if method == "adaptive":
                key = ((gain(spectra[m.name], nxt) - gain(spectra[m.name], cur)) / cost, -order[m.name])
            else:
                key = (-cur, -order[m.name])
            if best_key is None or key > best_key:
                best, best_key = (m, nxt, cost), key
        if best is None:
            return ranks
        m, nxt, cost = best
        ranks[m.name] = nxt
        spent += cost


def check_budget(modules: Sequence[TargetModule], budget_params: int) -> None:
    """Refuse a budget that cannot hold the smallest rank on even the cheapest layer."""
    cheapest = min(m.cost(RANKS[0]) for m in modules)
    if budget_params < cheapest:
        raise RstrError(
            f"budget of {budget_params:,} parameters cannot hold even a rank-{RANKS[0]} LoRA on the smallest layer "
            f"({cheapest:,} parameters); raise --budget"
        )


def _round_robin(modules: Sequence[TargetModule]) -> dict[str, int]:
    """Position of each module when taking one layer per block in turn, cheapest first in a block."""
    by_block: dict[str, list[TargetModule]] = {}
    for m in modules:
        by_block.setdefault(m.block, []).append(m)
    slots = {}
    for b, members in enumerate(by_block.values()):
        for j, m in enumerate(sorted(members, key=lambda m: (m.in_features + m.out_features, m.name))):
            slots[m.name] = (j, b)
    return {name: i for i, name in enumerate(sorted(slots, key=slots.__getitem__))}


def ranks_from_file(path: Path, modules: Sequence[TargetModule]) -> dict[str, int]:
    """Ranks from an ``allocation.json``, checked against the model's layers and ``RANKS``."""
    try:
        data = json.loads(Path(path).read_text())
        given = {str(m["name"]): int(m["rank"]) for m in data["modules"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RstrError(f"--allocation {path}: not a readable allocation.json ({type(err).__name__}: {err})") from None
    by_name = {m.name: m for m in modules}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise RstrError(f"--allocation {path}: module {unknown[0]} is not a linear layer of this model's blocks ({len(unknown)} unknown)")
    for name, rank in given.items():
        m = by_name[name]
        if rank > m.max_rank:
            raise RstrError(f"--allocation {path}: rank {rank} for {name} exceeds the layer's dimensions ({m.in_features}x{m.out_features}, max rank {m.max_rank})")
        if rank not in m.ranks():
            raise RstrError(f"--allocation {path}: rank {rank} for {name} is not one of {m.ranks()}")
    return {m.name: given.get(m.name, 0) for m in modules}


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


# ------------------------------------------------------------------------- calibration
@dataclass
class CalibrationResult:
    """What :func:`calibrate` wrote and measured."""

    out: Path
    ranks: dict[str, int]
    params: int
    losses: list[float]
    validation_before: float
    validation_after: float
    seconds: float


def calibrate(
    family: Family,
    schedule: GuidanceSchedule,
    out: str | os.PathLike[str],
    *,
    preset: str | Preset = "full",
    budget: float = 0.01,
    allocation: Method | Path = "adaptive",
    iterations: int | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """Allocate ranks by sensitivity, train the LoRA against the teacher and write ``out``.

    Calibration seed ``seed`` uses the images ``CALIBRATION_SEEDS.start + seed * (pool + validation)``
    onward.  ``family`` is left untouched (the student is a copy).  A checkpoint beside ``out`` is
    written every ``preset.checkpoint_every`` iterations; ``resume`` continues from it exactly.
    Every user error is raised before anything is computed or written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    p = PRESETS.get(preset) if isinstance(preset, str) else preset
    if p is None:
        raise RstrError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    iterations = p.iterations if iterations is None else iterations
    settings, modules = _check_inputs(family, schedule, out, p, budget, allocation, iterations, seed, force)
    settings["preset"] = preset if isinstance(preset, str) else "custom"
    ckpt = checkpoint_path(out)
    state = (_load_checkpoint(ckpt, settings) if resume else None) or _initial_state(family, schedule, modules, p, settings, allocation)
    pool, val = state["pool"].to(family.device), state["validation"].to(family.device)

    student, peft_model, params, opt = lora_student(family, state["ranks"], seed, p.lr)
    warmup = max(1, iterations // 20)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations))
    )
    gen = torch.Generator().manual_seed(seed)
    if "lora" in state:
        peft_model.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["generator"])
    losses: list[float] = list(state["losses"])

    bar = tqdm(range(state["iteration"], iterations), desc="calibrate", disable=not progress, initial=state["iteration"], total=iterations)
    for it in bar:
        loss = train_step(student, schedule, pool, p.batch_size, params, opt, gen)
        lr_sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4g}")
        if (it + 1) % p.checkpoint_every == 0 and it + 1 < iterations:
            lora = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
            _save_checkpoint(ckpt, {**state, "iteration": it + 1, "losses": losses, "lora": lora, "optimizer": opt.state_dict(),
                                    "lr_scheduler": lr_sched.state_dict(), "generator": gen.get_state()})

    ranks = state["ranks"]
    used = sum(m.cost(ranks[m.name]) for m in modules)
    result = CalibrationResult(out, ranks, used, losses, state["validation_before"], mean_loss(student, schedule, val),
                               time.perf_counter() - t0)
    _write_outputs(out, force, peft_model, family, schedule, modules, state["spectra"], result, settings)
    ckpt.unlink(missing_ok=True)
    return result


def _check_inputs(
    family: Family, schedule: GuidanceSchedule, out: Path, p: Preset, budget: float, allocation: Method | Path,
    iterations: int, seed: int, force: bool,
) -> tuple[dict, list[TargetModule]]:
    """Refuse bad input with one line each; return the run's settings and the target modules."""
    from rstr.evaluate import CALIBRATION_SEEDS, SeedRange

    if iterations < 1:
        raise RstrError(f"--steps {iterations} must be at least 1 training iteration")
    if not 0 < budget < 1:
        raise RstrError(f"--budget {budget} must be a fraction of the transformer's parameters in (0, 1), e.g. 0.01")
    if seed < 0:
        raise RstrError(f"--seed {seed} must be >= 0")
    if p.probe > p.pool:
        raise RstrError(f"the preset probes {p.probe} images but its pool holds only {p.pool}")
    if out.exists() and any(out.iterdir()) and not force:
        raise RstrError(f"{out} already exists; choose another --out or pass --force to replace it")
    schedule.check_fits(family.name, family.sampler)
    teacher = teacher_schedule(family)
    if schedule == teacher:
        raise RstrError(f"the schedule is the teacher itself ({teacher.describe()}); there is nothing to calibrate")
    modules = target_modules(family)
    budget_params = int(budget * transformer_params(family))
    if isinstance(allocation, Path):
        ranks = ranks_from_file(allocation, modules)
        used = sum(m.cost(ranks[m.name]) for m in modules)
        if used > budget_params:
            raise RstrError(f"--allocation {allocation} uses {used:,} parameters, more than the budget {budget_params:,}; raise --budget")
        if used == 0:
            raise RstrError(f"--allocation {allocation} gives every module rank 0; nothing to train")
    elif allocation in ("adaptive", "uniform"):
        check_budget(modules, budget_params)
    else:
        raise RstrError(f"allocation {allocation!r} is unknown; use adaptive, uniform or an allocation.json")
    per_seed = p.pool + p.validation
    seeds = SeedRange(CALIBRATION_SEEDS.start + seed * per_seed, CALIBRATION_SEEDS.start + (seed + 1) * per_seed)
    seeds.require_within(SeedRange(CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.stop - QUALITY_CHECK_IMAGES),
                         "calibration seeds (lower --seed)")
    settings = {
        "model": str(getattr(family, "path", type(family.transformer).__name__)),
        "family": family.name,
        "transformer": type(family.transformer).__name__,
        "schedule": schedule.to_dict(),
        "schedule_sha256": schedule.sha256(),
        "teacher": teacher.to_dict(),
        "preset_settings": asdict(p),
        "iterations": iterations,
        "budget": budget,
        "budget_params": budget_params,
        "allocation": str(allocation),
        "seed": seed,
        "calibration_seeds": [seeds.start, seeds.stop],
    }
    return settings, modules


def _initial_state(
    family: Family, schedule: GuidanceSchedule, modules: list[TargetModule], p: Preset, settings: dict, allocation: Method | Path
) -> dict:
    """Teacher samples, sensitivity, ranks and the uncalibrated validation loss: everything before training."""
    start, stop = settings["calibration_seeds"]
    noise, cond = class_conditioning(family, range(start, stop))
    data = teacher_data(family, teacher_schedule(family), noise, cond)
    pool, val = data.take(slice(0, p.pool)), data.take(slice(p.pool, None))
    spectra = measure_sensitivity(family, schedule, pool.take(slice(0, p.probe)), modules, p, settings["seed"])
    if isinstance(allocation, Path):
        ranks = ranks_from_file(allocation, modules)
    else:
        ranks = allocate(modules, settings["budget_params"], allocation, spectra)
    return {"settings": settings, "iteration": 0, "losses": [], "pool": pool, "validation": val, "spectra": spectra,
            "ranks": ranks, "validation_before": mean_loss(family, schedule, val)}


def _write_outputs(
    out: Path, force: bool, peft_model, family: Family, schedule: GuidanceSchedule, modules: list[TargetModule],
    spectra: dict[str, list[float]], result: CalibrationResult, settings: dict,
) -> None:
    """The adapter and its records, written to a temporary directory and renamed onto ``out``."""
    with atomic_dir(out, force=force) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        schedule.save(tmp / "schedule.json")
        write_json(tmp / "allocation.json", allocation_record(family, modules, result.ranks, spectra, settings))
        write_json(tmp / "calibration.json", {
            "format": CALIBRATION_FORMAT,
            **settings,
            "adapter_sha256": adapter_sha256(tmp),
            "lora_params": result.params,
            "validation_loss": {"uncalibrated": result.validation_before, "calibrated": result.validation_after,
                                "images": settings["preset_settings"]["validation"]},
            "losses": result.losses,
            "seconds": round(result.seconds, 1),
        })
        write_report(tmp, family, schedule, modules, result, spectra, settings)


def checkpoint_path(out: Path) -> Path:
    """Where the checkpoint of a calibration into ``out`` lives: a hidden sibling file."""
    return out.parent / f".{out.name}.checkpoint.pt"


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, settings: dict) -> dict | None:
    """The checkpoint's state if it exists and was written with the same settings."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("settings") != settings:
        differ = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise RstrError(f"checkpoint {path} was written with different settings ({', '.join(differ)}); drop --resume or delete it")
    return state


# ---------------------------------------------------------------------------- records
def allocation_record(
    family: Family, modules: Sequence[TargetModule], ranks: dict[str, int], spectra: dict[str, list[float]], settings: dict
) -> dict:
    """``allocation.json``: rank, parameters and sensitivity of every module, per block and kind."""
    total = transformer_params(family)
    used = sum(m.cost(ranks[m.name]) for m in modules)
    rows = []
    for m in modules:
        sens = gain(spectra[m.name], m.max_rank)
        rows.append({
            "name": m.name, "block": m.block, "kind": m.kind, "in_features": m.in_features, "out_features": m.out_features,
            "rank": ranks[m.name], "params": m.cost(ranks[m.name]), "sensitivity": sens,
            "sensitivity_per_param": sens / (m.in_features * m.out_features),
        })
    return {
        "format": ALLOCATION_FORMAT,
        "family": family.name,
        "transformer": type(family.transformer).__name__,
        "method": settings["allocation"],
        "ranks_allowed": [0, *RANKS],
        "budget": {"fraction": settings["budget"], "params": settings["budget_params"], "used": used, "used_fraction": used / total,
                   "transformer_params": total},
        "blocks": _group(rows, "block"),
        "kinds": _group(rows, "kind"),
        "modules": rows,
    }


def _group(rows: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        g = out.setdefault(r[key], {"params": 0, "sensitivity": 0.0, "adapted": 0, "modules": 0})
        g["params"] += r["params"]
        g["sensitivity"] += r["sensitivity"]
        g["adapted"] += r["rank"] > 0
        g["modules"] += 1
    return out


def write_report(
    directory: Path, family: Family, schedule: GuidanceSchedule, modules: Sequence[TargetModule], result: CalibrationResult,
    spectra: dict[str, list[float]], settings: dict,
) -> None:
    """``report.md`` and ``calibration.png``: ranks and sensitivity per block and kind, loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, ranks = teacher_schedule(family), result.ranks
    blocks = list(dict.fromkeys(m.block for m in modules))
    kinds = list(dict.fromkeys(m.kind for m in modules))
    params = {(b, k): 0 for b in blocks for k in kinds}
    sens = {(b, k): 0.0 for b in blocks for k in kinds}
    for m in modules:
        params[m.block, m.kind] += m.cost(ranks[m.name])
        sens[m.block, m.kind] += gain(spectra[m.name], m.max_rank)
    total_sens = sum(sens.values()) or 1.0

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(blocks))
    for ax, values, title in ((axes[0], params, "LoRA parameters per block"), (axes[1], sens, "sensitivity per block (share)")):
        bottom = [0.0] * len(blocks)
        for k in kinds:
            h = [values[b, k] / (total_sens if values is sens else 1) for b in blocks]
            ax.bar(x, h, bottom=bottom, label=k)
            bottom = [a + c for a, c in zip(bottom, h)]
        ax.set_xticks(list(x), [b.rsplit(".", 1)[-1] for b in blocks])
        ax.set_xlabel("block")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    axes[2].plot(range(1, len(result.losses) + 1), result.losses, lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    axes[2].set_title("calibration loss (MSE to teacher samples)")
    fig.tight_layout()
    fig.savefig(directory / "calibration.png", dpi=100)
    plt.close(fig)

    total = transformer_params(family)
    lines = [
        "# Stage-2 calibration",
        "",
        f"- model: `{settings['model']}` ({family.name}, {total:,} parameters)",
        f"- student schedule: {schedule.describe()}",
        f"- teacher: {teacher.describe()}, scale {teacher.scales[0]}",
        f"- allocation: {settings['allocation']}, budget {settings['budget']:.2%} = {settings['budget_params']:,} parameters, "
        f"used {result.params:,} ({result.params / total:.2%})",
        f"- preset {settings['preset']}, {settings['iterations']} iterations, seed {settings['seed']}, "
        f"calibration seeds [{settings['calibration_seeds'][0]}, {settings['calibration_seeds'][1]}), {result.seconds:.0f} s",
        f"- loss (MSE of final samples to the teacher's) on {settings['preset_settings']['validation']} validation images: "
        f"{result.validation_before:.4g} uncalibrated -> {result.validation_after:.4g} calibrated",
        "",
        "![ranks, sensitivity and loss](calibration.png)",
        "",
        "## Ranks per block and layer kind",
        "",
        "| block | " + " | ".join(kinds) + " | LoRA params | sensitivity share |",
        "|---|" + "---|" * (len(kinds) + 2),
    ]
    for b in blocks:
        cells = []
        for k in kinds:
            rs = [str(ranks[m.name]) for m in modules if m.block == b and m.kind == k]
            cells.append("/".join(rs) or "-")
        share = sum(sens[b, k] for k in kinds) / total_sens
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {sum(params[b, k] for k in kinds):,} | {share:.1%} |")
    lines += ["", "Sensitivity: the calibration loss a full-rank adapter on the module is predicted to remove: a rank-1 "
              "probe adapter's leave-one-out loss drop, spread over ranks by the module's Fisher eigenvalues "
              "(see `rstr.calibrate`).", ""]
    (directory / "report.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------ loading
def adapter_sha256(directory: str | os.PathLike[str]) -> str:
    """Content hash of the adapter's config and weights (what :func:`apply_adapter` merges)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode() + b"\0")
        h.update((Path(directory) / name).read_bytes())
    return h.hexdigest()


def check_adapter(family: Family, directory: str | os.PathLike[str]) -> None:
    """Raise one :class:`RstrError` line unless the adapter in ``directory`` fits ``family``'s model."""
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise RstrError(f"adapter directory {directory} does not exist; write one with `rstr calibrate --out {directory}`")
    missing = [n for n in ADAPTER_FILES if not (directory / n).is_file()]
    if missing:
        raise RstrError(f"{directory} is not a peft adapter directory (missing {', '.join(missing)})")
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise RstrError(f"{directory}/adapter_config.json is not valid JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise RstrError(f"{directory}: adapter type {config.get('peft_type')!r} is not a LoRA; rstr merges LoRA adapters only")
    record = directory / "allocation.json"
    if record.is_file():
        alloc = json.loads(record.read_text())
        if (alloc.get("family"), alloc.get("transformer")) != (family.name, type(family.transformer).__name__):
            raise RstrError(
                f"{directory} was calibrated for a {alloc.get('family')} {alloc.get('transformer')}, "
                f"not this {family.name} {type(family.transformer).__name__}; calibrate this model"
            )
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])\.weight", key)
            if m is None:
                raise RstrError(f"{directory}: unexpected tensor {key} in the adapter; only LoRA A/B weights are supported")
            shapes.setdefault(m.group(1), {})[m.group(2)] = tuple(f.get_slice(key).get_shape())
    problems = []
    for name, ab in sorted(shapes.items()):
        try:
            layer = family.transformer.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name} is not in this model")
            continue
        if not isinstance(layer, nn.Linear):
            problems.append(f"module {name} is a {type(layer).__name__}, not a Linear")
            continue
        a, b = ab.get("lora_A", (0, 0)), ab.get("lora_B", (0, 0))
        if a[1] != layer.in_features or b[0] != layer.out_features or a[0] != b[1]:
            problems.append(
                f"{name} has LoRA A{list(a)} B{list(b)} but the model's layer is Linear({layer.in_features}, {layer.out_features})"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RstrError(f"adapter {directory} does not fit this model: {problems[0]}{more}")


def load_adapter(family: Family, directory: str | os.PathLike[str]):
    """Attach the adapter (unmerged) to ``family.transformer`` in place and return the ``PeftModel``.

    ``family`` then runs with the adapter; pass the result to :func:`merge_adapter` to fold it in.
    """
    from peft import PeftModel

    check_adapter(family, directory)
    return PeftModel.from_pretrained(family.transformer, str(directory), is_trainable=False)


def merge_adapter(peft_model) -> nn.Module:
    """Fold the LoRA into the base weights (``W + (alpha/r) B A``) and return the plain transformer."""
    return peft_model.merge_and_unload()


def apply_adapter(family: Family, directory: str | os.PathLike[str]) -> None:
    """Load the adapter in ``directory`` and merge it into ``family``'s transformer."""
    family.transformer = merge_adapter(load_adapter(family, directory)).eval()


def quality_check(family: Family, schedule: GuidanceSchedule, adapter: str | os.PathLike[str], *, groups: int = 2) -> dict | None:
    """The model's own quality measure under ``schedule``, without and with the adapter (paired); None if it has none.

    Calibration lowers the distance to the constant-CFG teacher.  That improves the samples only
    where the sparse schedule is worse than the teacher: a schedule that already beats it (on the
    reference model, every searched schedule at 30-50% compute; docs/stage2.md) loses quality by
    matching it.  Models with a digits classifier are scored by FD on the last
    ``QUALITY_CHECK_IMAGES`` seeds of the calibration range, which no calibration seed reaches;
    other models have no sample-quality measure here, and their validation loss to the teacher
    (``calibration.json``) is the measure.
    """
    if not family.meta.get("classifier"):
        return None
    from rstr.evaluate import CALIBRATION_SEEDS, evaluate

    start = CALIBRATION_SEEDS.stop - QUALITY_CHECK_IMAGES
    kw = dict(num=QUALITY_CHECK_IMAGES // groups, groups=groups, seed_start=start, progress=False)
    before = evaluate(family, schedule, **kw)
    calibrated = copy.deepcopy(family)
    apply_adapter(calibrated, adapter)
    after = evaluate(calibrated, schedule, **kw)
    return {"metric": "fd", "seeds": [start, CALIBRATION_SEEDS.stop], "uncalibrated": before.fd, "calibrated": after.fd,
            "improves": after.fd_mean < before.fd_mean}


def describe_check(check: dict) -> str:
    """One line for a :func:`quality_check` record: the mean FD without and with the adapter."""
    before, after = (sum(check[k]) / len(check[k]) for k in ("uncalibrated", "calibrated"))
    return f"FD {before:.3f} without the adapter, {after:.3f} with it (validation seeds {check['seeds'][0]}-{check['seeds'][1]}, paired)"
