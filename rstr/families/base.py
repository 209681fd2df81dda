"""The contract every model family implements: the only place that knows a model.

Generic code (sampler, Stage-1, Stage-2, export, verification, reports) asks the family for
every fact it needs and never compares family names:

1. **conditioning**: the named batch-first tensors the denoiser takes (``cond_specs``), their
   kind (``conditioning``: class labels or text embeddings), ``num_classes`` where the model
   has classes, conditioning for image indices (``conditioning_for``), deterministic examples
   for checks (``example_conditioning``) and the unconditional counterpart (``unconditional``,
   and ``null_fill`` for bundles);
2. **calls**: the transformer on ``N`` rows (``denoise``) with the timestep it receives
   (``model_timestep``); raw outputs to scheduler input with guidance (``combine``) or
   without (``single``);
3. **defaults**: steps, guidance scale and the constant-CFG schedule built from them
   (:meth:`Family.constant_cfg`, the one constructor of the teacher and baseline);
4. **Stage-2**: its transformer blocks (``blocks``);
5. **quality**: how its samples are judged (``quality``: the digits metrics where the model
   ships the digits classifier and its latents are images, teacher fidelity otherwise), with
   ``image``, ``to_images`` and ``classifier_path``;
6. **export**: which ONNX exporter gives graphs ONNX Runtime runs (``export_dynamo``) and the
   patches that make the model traceable (``export_patches``).

In a guided step the batch is ``[cond; uncond]``.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from rstr.errors import ModelError, RstrError

if TYPE_CHECKING:
    from rstr.families.class_embeddings import ClassEmbeddings
    from rstr.families.text import TextEncoder, TextEncoderSpec
    from rstr.schedule import GuidanceSchedule

Conditioning = dict[str, torch.Tensor]
ConditioningKind = Literal["class-labels", "text-embeddings"]
Quality = Literal["digits", "teacher"]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype and shape; ``"batch"`` marks the dynamic axis.

    ``example`` is the constant that deterministic examples fill the tensor with (masks: 1,
    FLUX's distilled guidance: 3.5); ``None`` draws normal values (floats) or class labels.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]
    example: float | None = None

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}


@dataclass(frozen=True)
class ImageSpec:
    """Latents that are (or unpack to) images ``[C, size, size]`` with values in ``range``."""

    channels: int
    size: int
    range: tuple[float, float]

    @classmethod
    def from_meta(cls, meta: dict) -> ImageSpec | None:
        image = meta.get("image")
        if image is None:
            return None
        try:
            lo, hi = image["range"]
            return cls(int(image["channels"]), int(image["size"]), (float(lo), float(hi)))
        except (TypeError, KeyError, ValueError):
            raise ModelError(f"rstr.json: 'image' must be {{channels, size, range: [lo, hi]}}, got {image!r}") from None

    def to_json(self) -> dict:
        return {"channels": self.channels, "size": self.size, "range": list(self.range)}


class Family(ABC):
    """Adapter around one diffusers transformer and its scheduler."""

    name: ClassVar[str]
    transformer_class: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    conditioning: ClassVar[ConditioningKind]
    default_steps_fallback: ClassVar[int]
    default_scale_fallback: ClassVar[float]  # the stock pipeline's default guidance scale
    export_dynamo: ClassVar[bool] = True  # False: the TorchScript exporter (deployment.md)
    vae_class: ClassVar[str] = "AutoencoderKL"  # the diffusers class of a pipeline directory's vae/
    latent_multiple: ClassVar[int] = 1  # a resizable latent side is a multiple of it (2x2 packing: 2)
    text_len: int = 0  # prompt tokens of text models (rstr.json, --max-text-len); 0: the model takes no prompts

    def __init__(
        self,
        transformer: nn.Module,
        scheduler,
        default_steps: int | None = None,
        meta: dict | None = None,
        path: Path | None = None,
        class_embeddings: ClassEmbeddings | None = None,
    ):
        # A diffusers model: its ``config`` and submodules are attributes nn.Module's types do not know.
        self.transformer: Any = transformer.eval()
        self.scheduler = scheduler
        self.default_steps = default_steps or self.default_steps_fallback
        self.meta = dict(meta or {})
        self.path = path
        self.class_embeddings = class_embeddings
        self.prompts: Path | None = None  # the prompt set file that class_embeddings came from, if any
        self.vae: Any = (
            None  # the pipeline's VAE (a diffusers model, untyped here) and text encoders, when the directory has them
        )
        self.text_encoders: list[TextEncoder] = []

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

    @classmethod
    @abstractmethod
    def default_scheduler(cls):
        """The scheduler of a transformer directory that ships none."""

    # ------------------------------------------------------------------- defaults
    @property
    def default_scale(self) -> float:
        """The model's constant CFG scale: ``default_scale`` in its ``rstr.json``, else the stock pipeline's."""
        scale = self.meta.get("default_scale")
        return float(scale) if scale is not None else self.default_scale_fallback

    def constant_cfg(
        self, scale: float | None = None, steps: int | None = None, *, default_steps: int | None = None
    ) -> GuidanceSchedule:
        """Constant CFG (every step guided) at ``scale`` (default: the model's) and ``steps`` (default: the model's).

        Compute is counted against ``default_steps`` (default: the model's), so ``--steps 8`` on a
        25-step model is 32% of constant CFG.  The teacher of Stage-2 and the baseline of every
        report are this schedule.
        """
        from rstr.schedule import GuidanceSchedule

        n = steps if steps is not None else self.default_steps
        return GuidanceSchedule.constant(
            self.default_scale if scale is None else scale,
            n,
            family=self.name,
            sampler=self.sampler,
            default_steps=default_steps or self.default_steps,
        )

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

    @property
    def num_classes(self) -> int | None:
        """Classes the model is conditioned on (a class table's for text models); ``None`` if it has none."""
        return self.class_embeddings.num_classes if self.class_embeddings is not None else None

    def conditioning_for(self, labels: torch.Tensor) -> tuple[Conditioning, Conditioning | None]:
        """Conditioning (and its unconditional counterpart, or None where it is derived) for class ``labels``.

        Text models take their class table's rows (the negative prompt as unconditional input);
        models without classes need prompts from the user.
        """
        if self.class_embeddings is None:
            raise RstrError(f"this {self.name} model has no class table (class_embeddings/); pass prompt embeddings")
        labels = self._check_labels(labels)
        to = lambda c: {k: v.to(self.device) for k, v in c.items()}  # noqa: E731
        return to(self.class_embeddings.rows(labels)), to(self.class_embeddings.negative(len(labels)))

    def _check_labels(self, labels: torch.Tensor | list[int], allow_null: bool = False) -> torch.Tensor:
        """Labels as int64 ``[N]``, each in ``0..num_classes - 1`` (or the null class ``num_classes``)."""
        t = torch.as_tensor(labels).reshape(-1)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise RstrError(f"class labels must be integers, got {t.dtype}")
        n = self.num_classes
        hi = (n or 0) + (1 if allow_null else 0)
        bad = [int(x) for x in t if n is None or not 0 <= int(x) < hi]
        if bad:
            null = f" or the null class {n}" if allow_null else ""
            raise RstrError(f"class label {bad[0]} is out of range; this model has classes 0..{(n or 0) - 1}{null}")
        return t.to(torch.int64)

    def example_conditioning(self, batch: int, seed: int = 0) -> tuple[Conditioning, Conditioning | None]:
        """Deterministic conditioning for checks (verification, merge): class labels, or random embeddings.

        Labels are ``0, 1, ...`` modulo ``num_classes`` and their unconditional input is derived;
        other inputs are ``TensorSpec.example`` constants or standard normals drawn from ``seed``,
        for the conditional and then the unconditional input.
        """
        g = torch.Generator().manual_seed(seed)
        if self.conditioning == "class-labels":
            return {s.name: torch.arange(batch) % (self.num_classes or 1) for s in self.cond_specs()}, None

        def draw() -> Conditioning:
            return {
                s.name: (
                    torch.full(s.concrete(batch), s.example)
                    if s.example is not None
                    else torch.randn(s.concrete(batch), generator=g)
                )
                for s in self.cond_specs()
            }

        return draw(), draw()

    def unconditional(self, cond: Conditioning) -> Conditioning:
        """The unconditional input matching ``cond``: the null class, the class table's negative prompt, or given."""
        if self.class_embeddings is not None:
            n = next(iter(cond.values())).shape[0]
            return {k: v.to(self.device) for k, v in self.class_embeddings.negative(n).items()}
        raise RstrError(f"{self.name} needs unconditional (negative-prompt) embeddings for guided steps; pass `uncond=`")

    def null_fill(self) -> dict[str, int | float] | None:
        """A constant per conditioning input that makes it unconditional (DiT's null class); None: the user supplies it."""
        return None

    def check_conditioning(self, cond: Conditioning, batch: int, what: str = "conditioning") -> Conditioning:
        """Check names, shapes and values of user conditioning; return it on the model's device."""
        if not isinstance(cond, dict):
            raise RstrError(f"{what} must be a dict of tensors keyed by {[s.name for s in self.cond_specs()]}")
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
        from rstr.families.timesteps import at_timesteps

        return at_timesteps(scheduler, schedule.timesteps, device=self.device)

    @abstractmethod
    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Raw transformer output for ``N`` rows; inputs in the model's dtype (``timestep`` ``[N]``)."""

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """:meth:`denoise` with float32 inputs and output, computed in the model's dtype: what the denoiser graph does."""
        dtype = self.dtype
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        return self.denoise(cast(sample), cast(timestep), {k: cast(v) for k, v in cond.items()}).float()

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

    # --------------------------------------------------------------------- quality
    @property
    def image(self) -> ImageSpec | None:
        """What the final latents are as images, for models whose latents are pixels (``image`` in ``rstr.json``)."""
        return ImageSpec.from_meta(self.meta)

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents as images ``[N, C, H, W]`` (identity for spatial latents; packed ones are unpacked)."""
        return latents

    def resize(self, latent_side: int) -> bool:
        """Generate ``latent_side`` x ``latent_side`` latents; False where the transformer fixes the size."""
        return False

    def text_encoder_specs(self) -> list[TextEncoderSpec]:
        """The pipeline's text encoders as its stock pipeline uses them (:mod:`rstr.families.text`); [] for none."""
        return []

    # --------------------------------------------------------------------- decoder
    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (as the sampler returns them) as the VAE takes them: unscaled (and unpacked)."""
        return latents / self.vae.config.scaling_factor

    def vae_images(self, decoded: torch.Tensor) -> torch.Tensor:
        """The VAE's output as images ``[N, C, H, W]`` in [-1, 1]."""
        return decoded

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, as the stock pipelines compute it from the VAE's config."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[N, H, W, C]`` in [0, 1] from float32 final latents through the VAE, as the stock pipeline decodes."""
        if self.vae is None:
            raise RstrError(f"this {self.name} model has no VAE (no vae/ beside transformer/); its latents are not decoded")
        dtype = next(self.vae.parameters()).dtype
        decoded = self.vae.decode(self.vae_latents(latents.float()).to(dtype), return_dict=False)[0]
        return (self.vae_images(decoded).float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def image_shape(self) -> tuple[int, int, int] | None:
        """``(H, W, C)`` of the images :meth:`decode` gives; None without a VAE."""
        if self.vae is None:
            return None
        side = self.to_images(torch.zeros(self.sample_shape(1))).shape[-1] * self.vae_scale_factor
        return side, side, self.image_channels

    @property
    def image_channels(self) -> int:
        """Channels of the decoded images (the VAE's output channels)."""
        return int(self.vae.config.out_channels)

    @property
    def classifier_path(self) -> Path | None:
        """The digits classifier shipped in the model directory (``classifier`` in ``rstr.json``), if any."""
        name = self.meta.get("classifier")
        if name is None or self.path is None:
            return None
        p = PurePosixPath(str(name))
        if p.is_absolute() or ".." in p.parts:
            raise ModelError(f"{self.path}/rstr.json: classifier {name!r} must be a file inside the model directory")
        return self.path / Path(*p.parts)

    @property
    def quality(self) -> Quality:
        """``digits``: FD and class accuracy by the shipped digits classifier; ``teacher``: fidelity to constant CFG."""
        ok = self.classifier_path is not None and self.image is not None and self.num_classes is not None
        return "digits" if ok else "teacher"

    # ---------------------------------------------------------------------- export
    @contextlib.contextmanager
    def export_patches(self) -> Iterator[None]:
        """Patches that make the transformer traceable, undone on exit (the model is left as found)."""
        yield

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
            "default_scale": self.default_scale,
            "num_classes": self.num_classes,
            "quality": self.quality,
            "sample_shape": list(self.sample_shape(1)[1:]),
            "conditioning": [s.to_json() for s in self.cond_specs()],
        }


class SpatialFamily(Family):
    """DiT and PixArt-alpha: ``[B, C, S, S]`` latents, optional learned sigma in the output, DDIM by default."""

    @classmethod
    def default_scheduler(cls):
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)

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
