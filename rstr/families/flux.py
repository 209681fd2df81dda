"""FLUX.1: packed latents, T5 + CLIP-pooled embeddings, flow matching (Euler).

True CFG follows ``FluxPipeline``'s ``true_cfg_scale``: negative-prompt embeddings are the
unconditional input and ``eps = neg + w (pos - neg)``.  A guidance-distilled model
(``guidance_embeds``) keeps its ``guidance`` input, a conditioning tensor like any other.
Text and image position ids depend only on the resolution and text length, so they are
fixed per configuration (baked into an exported graph, not inputs).
"""

from __future__ import annotations

import numpy as np
import torch

from rstr.families.base import Conditioning, Family, TensorSpec
from rstr.families.text import TextEncoderSpec


def calculate_shift(seq_len: int, config) -> float:
    """Resolution-dependent shift ``mu`` of the flow-matching sigmas, as the pipelines compute it."""
    x0, x1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    y0, y1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return seq_len * m + (y0 - m * x0)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: 2x2 patches as tokens, as the FLUX/Qwen pipelines pack."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for square latents of side ``size``."""
    b, _, c4 = x.shape
    x = x.view(b, size // 2, size // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, size, size)


class FlowMatchFamily(Family):
    """Shared by FLUX and Qwen-Image: packed 2x2 latents and flow-matching sigmas."""

    conditioning = "text-embeddings"
    text_len = 16
    latent_size = 16  # unpacked latent height = width
    latent_multiple = 2  # 2x2 latent pixels per token

    def __init__(self, *args, latent_size: int | None = None, text_len: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_size = latent_size or self.meta.get("latent_size", self.latent_size)
        self.text_len = text_len or self.meta.get("text_len", self.text_len)

    @classmethod
    def default_scheduler(cls):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def resize(self, latent_side: int) -> bool:
        self.latent_size = latent_side
        return True

    @property
    def seq_len(self) -> int:
        return (self.latent_size // 2) ** 2

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.seq_len, self.latent_channels * 4)

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, self.latent_size)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked, then ``x / scaling_factor + shift_factor`` (FluxPipeline)."""
        cfg = self.vae.config
        return self.to_images(latents) / cfg.scaling_factor + (cfg.shift_factor or 0.0)

    def model_timestep(self, t) -> float:
        return float(torch.as_tensor(t, dtype=torch.float32) / 1000)

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if scheduler.config.get("use_dynamic_shifting", False):
            scheduler.set_timesteps(
                num_steps, device=self.device, sigmas=sigmas, mu=calculate_shift(self.seq_len, scheduler.config)
            )
        else:
            scheduler.set_timesteps(num_steps, device=self.device, sigmas=sigmas)
        scheduler.set_begin_index(0)

    def blocks(self):
        named = [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.transformer.transformer_blocks)]
        singles = getattr(self.transformer, "single_transformer_blocks", None) or []
        return named + [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(singles)]


class FluxFamily(FlowMatchFamily):
    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_classes = ("FluxPipeline",)
    default_steps_fallback = 28
    default_scale_fallback = 4.0  # true CFG (FluxPipeline's true_cfg_scale) as commonly used; its default 1 disables it

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        c, s = self.latent_channels, self.latent_size
        return pack_latents(randn_tensor((batch, c, s, s), generator=generator, device=self.device, dtype=torch.float32))

    def cond_specs(self) -> list[TensorSpec]:
        cfg = self.transformer.config
        specs = [
            TensorSpec("encoder_hidden_states", torch.float32, ("batch", self.text_len, int(cfg.joint_attention_dim))),
            TensorSpec("pooled_projections", torch.float32, ("batch", int(cfg.pooled_projection_dim))),
        ]
        if cfg.guidance_embeds:
            specs.append(TensorSpec("guidance", torch.float32, ("batch",), example=3.5))
        return specs

    def text_encoder_specs(self) -> list[TextEncoderSpec]:
        """CLIP's pooled output (its tokenizer's length, 77) and T5's last hidden state (``text_len`` tokens), no masks."""
        return [
            TextEncoderSpec("text_encoder", "tokenizer", None, "pooler_output", "pooled_projections"),
            TextEncoderSpec("text_encoder_2", "tokenizer_2", self.text_len, "last_hidden_state", "encoder_hidden_states"),
        ]

    def _ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.latent_size // 2
        rows, cols = torch.meshgrid(torch.arange(half), torch.arange(half), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(self.device, torch.float32)
        txt_ids = torch.zeros(self.text_len, 3, device=self.device, dtype=torch.float32)
        return txt_ids, img_ids

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        txt_ids, img_ids = self._ids()
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
