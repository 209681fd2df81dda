"""Qwen-Image: packed latents, Qwen2.5-VL embeddings with a mask, flow matching (Euler).

True CFG as ``QwenImagePipeline``: ``comb = neg + w (pos - neg)``, then each token's
prediction is rescaled to the norm of the conditional one (``comb * |pos| / |comb|``).
Its text encoder is a Qwen2.5-VL model with a chat template and a dropped prompt prefix; it
stays outside the bundle: Qwen-Image bundles take prompt embeddings ("embeddings in").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rstr.families.base import Conditioning, TensorSpec
from rstr.families.flux import FlowMatchFamily, pack_latents


class QwenImageFamily(FlowMatchFamily):
    name = "qwenimage"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_classes = ("QwenImagePipeline",)
    default_steps_fallback = 50
    default_scale_fallback = 4.0  # QwenImagePipeline's true_cfg_scale

    vae_class = "AutoencoderKLQwenImage"

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked to one video frame ``[N, C, 1, H, W]``, then ``x * std + mean`` per channel (QwenImagePipeline)."""
        cfg = self.vae.config
        shape = (1, len(cfg.latents_mean), 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=latents.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=latents.dtype).view(shape)
        return self.to_images(latents)[:, :, None] * std + mean

    def vae_images(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded[:, :, 0]  # the one frame

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.input_channels)  # the video VAE decodes to its input channels

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        c, s = self.latent_channels, self.latent_size
        x = randn_tensor((batch, 1, c, s, s), generator=generator, device=self.device, dtype=torch.float32)
        return pack_latents(x[:, 0])

    def cond_specs(self) -> list[TensorSpec]:
        dim = int(self.transformer.config.joint_attention_dim)
        return [
            TensorSpec("encoder_hidden_states", torch.float32, ("batch", self.text_len, dim)),
            TensorSpec("encoder_hidden_states_mask", torch.float32, ("batch", self.text_len), example=1.0),
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

    @contextlib.contextmanager
    def export_patches(self) -> Iterator[None]:
        """Real-valued rotary embedding from tables precomputed for this resolution and text length.

        ONNX has no complex tensors (``torch.polar``/``view_as_complex``; deployment.md), and the
        tables depend only on the configuration, so they become constants of the graph.
        """
        from diffusers.models.transformers import transformer_qwenimage as qmod

        pos_embed = self.transformer.pos_embed
        half = self.latent_size // 2
        with torch.no_grad():
            img, txt = pos_embed([[(1, half, half)]], max_txt_seq_len=self.text_len, device=self.device)

        def table(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                freqs.real.repeat_interleave(2, -1)[:, None].contiguous(),
                freqs.imag.repeat_interleave(2, -1)[:, None].contiguous(),
            )

        tables = (table(img), table(txt))
        original_apply = qmod.apply_rotary_emb_qwen
        pos_embed.forward = lambda *args, **kwargs: tables
        qmod.apply_rotary_emb_qwen = _real_rotary
        try:
            yield
        finally:
            del pos_embed.forward
            qmod.apply_rotary_emb_qwen = original_apply


def _real_rotary(
    x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], use_real: bool = False, use_real_unbind_dim: int = -1
) -> torch.Tensor:
    """Qwen-Image rotary embedding with real cos/sin tables instead of complex numbers.

    ``(a + ib)(c + is)`` on interleaved pairs, written with strided slices (not a reshape
    to ``(..., -1, 2)``, which freezes shapes when traced).
    """
    cos, sin = freqs  # [S, 1, D] each, interleave-repeated
    xf = x.float()
    rotated = torch.stack([-xf[..., 1::2], xf[..., 0::2]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)
