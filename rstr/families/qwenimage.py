"""Qwen-Image: packed latents, Qwen2.5-VL embeddings with a mask, flow matching (Euler).

True CFG as ``QwenImagePipeline``: ``comb = neg + w (pos - neg)``, then each token's
prediction is rescaled to the norm of the conditional one (``comb * |pos| / |comb|``).
"""

from __future__ import annotations

import torch

from rstr.families.base import Conditioning, TensorSpec
from rstr.families.flux import FlowMatchFamily, pack_latents


class QwenImageFamily(FlowMatchFamily):
    name = "qwenimage"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_class = "QwenImagePipeline"
    default_steps_fallback = 50

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        c, s = self.latent_channels, self.latent_size
        x = randn_tensor((batch, 1, c, s, s), generator=generator, device=self.device, dtype=torch.float32)
        return pack_latents(x[:, 0])

    def cond_specs(self) -> list[TensorSpec]:
        dim = int(self.transformer.config.joint_attention_dim)
        return [
            TensorSpec("encoder_hidden_states", torch.float32, ("batch", self.text_len, dim)),
            TensorSpec("encoder_hidden_states_mask", torch.float32, ("batch", self.text_len)),
        ]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        half = self.latent_size // 2
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
            # One entry: the rotary embedding reads only the first image's shape, and a
            # list sized by the batch would freeze the batch axis when exported.
            img_shapes=[[(1, half, half)]],
            return_dict=False,
        )[0]

    def combine(self, out_c: torch.Tensor, out_u: torch.Tensor, scale) -> torch.Tensor:
        comb = out_u + scale * (out_c - out_u)
        return comb * (torch.norm(out_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
