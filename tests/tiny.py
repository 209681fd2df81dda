"""Tiny random models of each family, built from configs (no downloads), for parity tests."""

from __future__ import annotations

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


def tiny_clip(path) -> None:
    """Save a random 1-layer CLIP model and a processor (a character-level tokenizer built here) to ``path``."""
    import json

    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(path)
