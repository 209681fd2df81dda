"""Tiny random models of each family, built from configs (no downloads), for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rstr.families import DiTFamily, FluxFamily, PixArtFamily, QwenImageFamily

TEXT_LEN = 8


def tiny_dit(learned_sigma: bool = True, num_classes: int = 1000) -> DiTFamily:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learned_sigma else 4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )
    return DiTFamily(model, DDIMScheduler(clip_sample=False), default_steps=4)


def tiny_pixart() -> PixArtFamily:
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return PixArtFamily(model, DDIMScheduler(clip_sample=False), default_steps=4, text_len=TEXT_LEN)


def tiny_flux(guidance_embeds: bool = False) -> FluxFamily:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxFamily(model, sched, default_steps=4, latent_size=8, text_len=TEXT_LEN)


def tiny_qwenimage() -> QwenImageFamily:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift_terminal=0.02,
    )
    return QwenImageFamily(model, sched, default_steps=4, latent_size=8, text_len=TEXT_LEN)


def text_conditioning(family, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random embeddings for the text families; masks keep every token but the last two of row 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in family.cond_specs():
        shape = spec.concrete(batch)
        if spec.name.endswith("mask"):
            mask = torch.ones(shape)
            mask[0, -2:] = 0
            out[spec.name] = mask
        elif spec.name == "guidance":
            out[spec.name] = torch.full(shape, 3.5)
        else:
            out[spec.name] = torch.randn(shape, generator=g)
    return out


def tiny_vae(family):
    """A VAE of the family's class with 8x spatial compression (as real ones), a few channels, random weights."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    torch.manual_seed(1)
    channels = family.latent_channels
    if family.vae_class == "AutoencoderKLQwenImage":
        return AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=channels,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            latents_mean=[0.1 * i - 0.2 for i in range(channels)],
            latents_std=[1.0 + 0.5 * i for i in range(channels)],
        )
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=channels,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.3611 if family.name == "flux" else 0.18215,
        shift_factor=0.1159 if family.name == "flux" else None,  # FluxPipeline adds it unconditionally
    )


def save_model(family, directory: Path, vae=None) -> Path:
    """A transformer-plus-scheduler directory (and ``vae/`` when given), as a user would have on disk."""
    family.transformer.save_pretrained(directory / "transformer")
    family.scheduler.save_pretrained(directory / "scheduler")
    if vae is not None:
        vae.save_pretrained(directory / "vae")
    meta = {"default_steps": 4}
    if family.name != "dit":
        meta["text_len"] = TEXT_LEN
    if family.name in ("flux", "qwenimage"):
        meta["latent_size"] = family.latent_size
    (directory / "rstr.json").write_text(json.dumps(meta))
    return directory
