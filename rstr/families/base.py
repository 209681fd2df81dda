"""The contract every model family implements, and what the sampler and exporter rely on.

A family wraps one diffusers transformer and knows four things the generic code does not:

1. the *conditioning* it takes, as named tensors with a batch axis (``graph_inputs``),
   and how to build the unconditional counterpart;
2. how to call the transformer for a batch of ``N`` rows (``denoise``), with the timestep
   value the model receives (``model_timestep``);
3. how to turn raw outputs into the model output the scheduler consumes, with guidance
   (``combine``) or without (``single``);
4. which modules are its transformer blocks (``blocks``), for Stage-2.

Conditioning tensors are batch-first.  In a guided step the batch is ``[cond; uncond]``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from rstr.errors import ModelError, RstrError

if TYPE_CHECKING:
    from rstr.schedule import GuidanceSchedule

Conditioning = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype and shape; ``"batch"`` marks the dynamic axis."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}


class Family(ABC):
    """Adapter around one diffusers transformer and its scheduler."""

    name: ClassVar[str]
    transformer_class: ClassVar[str]
    pipeline_class: ClassVar[str]
    default_steps_fallback: ClassVar[int]

    def __init__(self, transformer: nn.Module, scheduler, default_steps: int | None = None, meta: dict | None = None):
        self.transformer = transformer.eval()
        self.scheduler = scheduler
        self.default_steps = default_steps or self.default_steps_fallback
        self.meta = dict(meta or {})

    # --------------------------------------------------------------------- identity
    @property
    def sampler(self) -> str:
        """Name of the scheduler family that drives the model, recorded in schedules."""
        return _sampler_name(self.scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def fresh_scheduler(self):
        """An independent copy of the scheduler, so that runs never share step state."""
        return copy.deepcopy(self.scheduler)

    # ----------------------------------------------------------------- conditioning
    @abstractmethod
    def sample_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the latents the transformer denoises (packed for FLUX and Qwen-Image)."""

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise drawn the way the stock pipeline draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self.sample_shape(batch), generator=generator, device=self.device, dtype=torch.float32)

    @abstractmethod
    def cond_specs(self) -> list[TensorSpec]:
        """The conditioning inputs of the denoiser graph (all batch-first)."""

    def graph_inputs(self) -> list[TensorSpec]:
        """Every input of the denoiser graph, described once for ONNX, TensorRT and the runtimes."""
        return [
            TensorSpec("sample", torch.float32, ("batch", *self.sample_shape(1)[1:])),
            TensorSpec("timestep", torch.float32, ("batch",)),
            *self.cond_specs(),
        ]

    def graph_output(self) -> TensorSpec:
        out = self.output_shape(1)
        return TensorSpec("model_output", torch.float32, ("batch", *out[1:]))

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return self.sample_shape(batch)

    def unconditional(self, cond: Conditioning) -> Conditioning:
        """The unconditional input matching ``cond``; families without a null class need it given."""
        raise RstrError(
            f"{self.name} needs unconditional (negative-prompt) embeddings for guided steps; pass `uncond=`"
        )

    def check_conditioning(self, cond: Conditioning, batch: int, what: str = "conditioning") -> Conditioning:
        """Check names, shapes and values of user conditioning; return it on the model's device."""
        specs = {s.name: s for s in self.cond_specs()}
        missing = sorted(set(specs) - set(cond))
        extra = sorted(set(cond) - set(specs))
        if missing or extra:
            raise RstrError(f"{what}: expected tensors {sorted(specs)}, missing {missing}, unexpected {extra}")
        out = {}
        for name, spec in specs.items():
            t = torch.as_tensor(cond[name])
            want = spec.concrete(batch)
            if tuple(t.shape) != want:
                raise RstrError(f"{what}: {name} has shape {tuple(t.shape)}, expected {want}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RstrError(f"{what}: {name} contains NaN or infinite values")
            out[name] = t.to(device=self.device, dtype=spec.dtype)
        return out

    # ----------------------------------------------------------------------- calls
    def model_timestep(self, t: torch.Tensor | float) -> float:
        """The timestep value the transformer receives for scheduler timestep ``t``."""
        return float(t)

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        """Configure ``scheduler`` for ``num_steps`` steps the way the stock pipeline does."""
        scheduler.set_timesteps(num_steps, device=self.device)

    def scheduler_for(self, schedule: GuidanceSchedule):
        """A fresh scheduler set up for ``schedule``: its own timesteps when it has them, else the stock spacing."""
        scheduler = self.fresh_scheduler()
        if schedule.timesteps is None:
            self.set_timesteps(scheduler, schedule.num_steps)
            return scheduler
        from rstr.families.ddim import at_timesteps

        return at_timesteps(scheduler, schedule.timesteps, device=self.device)

    @abstractmethod
    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Raw transformer output for ``N`` rows; ``timestep`` is float32 ``[N]``."""

    def single(self, out: torch.Tensor) -> torch.Tensor:
        """Scheduler input from a conditional-only output (drops learned sigma)."""
        return out

    def combine(self, out_c: torch.Tensor, out_u: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """Scheduler input from a guided step: ``u + w (c - u)``, family rules applied."""
        c, u = self.single(out_c), self.single(out_u)
        return u + scale * (c - u)

    @abstractmethod
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The transformer blocks, as (qualified name, module), in depth order."""

    # -------------------------------------------------------------------- metadata
    def describe(self) -> dict:
        n_params = sum(p.numel() for p in self.transformer.parameters())
        return {
            "family": self.name,
            "transformer": type(self.transformer).__name__,
            "parameters": n_params,
            "blocks": len(self.blocks()),
            "scheduler": type(self.scheduler).__name__,
            "sampler": self.sampler,
            "default_steps": self.default_steps,
            "sample_shape": list(self.sample_shape(1)[1:]),
            "conditioning": [s.to_json() for s in self.cond_specs()],
        }


class SpatialFamily(Family):
    """DiT and PixArt-alpha: ``[B, C, S, S]`` latents, optional learned sigma in the output."""

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def learned_sigma(self) -> bool:
        """True when the transformer predicts ``[eps, sigma]`` (``2C`` output channels)."""
        return int(self.transformer.config.out_channels) == 2 * self.latent_channels

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        s = int(self.transformer.config.sample_size)
        return (batch, self.latent_channels, s, s)

    def output_shape(self, batch: int) -> tuple[int, ...]:
        s = int(self.transformer.config.sample_size)
        return (batch, int(self.transformer.config.out_channels), s, s)

    def single(self, out: torch.Tensor) -> torch.Tensor:
        return out[:, : self.latent_channels] if self.learned_sigma else out

    def blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.transformer.transformer_blocks)]


def _sampler_name(scheduler) -> str:
    name = type(scheduler).__name__
    return {
        "DDIMScheduler": "ddim",
        "FlowMatchEulerDiscreteScheduler": "flow_euler",
        "DPMSolverMultistepScheduler": "dpmsolver",
        "EulerDiscreteScheduler": "euler",
        "DDPMScheduler": "ddpm",
    }.get(name, name)


def expand_timestep(t: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """A float32 ``[n]`` timestep tensor (never float64: see deployment traps)."""
    return torch.full((n,), float(t), dtype=torch.float32, device=device)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelError(message)
