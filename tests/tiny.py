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


def save_model(family, directory: Path, vae=None, text: dict | None = None) -> Path:
    """A transformer-plus-scheduler directory (and ``vae/``, text encoders and tokenizers when given), as on disk."""
    family.transformer.save_pretrained(directory / "transformer")
    family.scheduler.save_pretrained(directory / "scheduler")
    if vae is not None:
        vae.save_pretrained(directory / "vae")
    for folder, component in (text or {}).items():
        component.save_pretrained(directory / folder)
    meta = {"default_steps": 4}
    if family.name != "dit":
        meta["text_len"] = TEXT_LEN
    if family.name in ("flux", "qwenimage"):
        meta["latent_size"] = family.latent_size
    (directory / "rstr.json").write_text(json.dumps(meta))
    return directory


WORDS = ["a", "photo", "of", "red", "fox", "in", "the", "snow", "cat", "on", "mat", "blue", "sky"]


def tiny_tokenizer(kind: str, max_length: int):
    """A word-level fast tokenizer built in memory: T5's conventions (``</s>`` appended, ``<pad>`` 0) or CLIP's
    (``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        tok.normalizer = normalizers.Lowercase()
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
        )
        names = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        names = dict(eos_token="</s>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=max_length, **names)


def tiny_t5(dim: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    config = T5Config(
        vocab_size=3 + len(WORDS), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=2, num_heads=2, decoder_start_token_id=0
    )
    return T5EncoderModel(config).eval()


def tiny_clip_text(dim: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    config = CLIPTextConfig(
        vocab_size=3 + len(WORDS),
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_text_components(family) -> dict:
    """The pipeline folders of the family's text encoders: T5 for PixArt-alpha; CLIP and T5 for FLUX."""
    dim = family.cond_specs()[0].shape[-1]  # encoder_hidden_states' width
    if family.name == "pixart":
        return {"text_encoder": tiny_t5(dim), "tokenizer": tiny_tokenizer("t5", TEXT_LEN)}
    pooled = family.cond_specs()[1].shape[-1]
    return {
        "text_encoder": tiny_clip_text(pooled),
        "tokenizer": tiny_tokenizer("clip", 77),
        "text_encoder_2": tiny_t5(dim),
        "tokenizer_2": tiny_tokenizer("t5", TEXT_LEN),
    }


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


def stock_pipeline(family, vae=None, scheduler=None):
    """The stock diffusers pipeline around ``family``'s transformer, without text encoders (embeddings in)."""
    import diffusers

    parts = dict(transformer=family.transformer, vae=vae, scheduler=scheduler or family.fresh_scheduler())
    if family.name == "dit":
        return diffusers.DiTPipeline(**parts)
    if family.name == "pixart":
        return diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, **parts)
    if family.name == "flux":
        return diffusers.FluxPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, **parts)
    return diffusers.QwenImagePipeline(text_encoder=None, tokenizer=None, **parts)


STOCK_ARGUMENTS = {  # a text pipeline's argument for each conditioning input; its negative is "negative_" + it
    "pixart": {"encoder_hidden_states": "prompt_embeds", "encoder_attention_mask": "prompt_attention_mask"},
    "flux": {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"},
    "qwenimage": {"encoder_hidden_states": "prompt_embeds", "encoder_hidden_states_mask": "prompt_embeds_mask"},
}


def stock_call(pipe, family, cond: dict, uncond: dict | None = None, **kw):
    """``pipe(...).images`` for conditioning given as class labels or embeddings, negatives from ``uncond``.

    ``kw`` is the rest of the call (scales, steps, generator, output type); text pipelines get the
    size of the family's latents and PixArt-alpha no resolution binning.
    """
    if family.name == "dit":
        return pipe(class_labels=cond["class_labels"].tolist(), **kw).images
    args = {arg: cond[name] for name, arg in STOCK_ARGUMENTS[family.name].items()}
    if uncond is not None:
        args |= {f"negative_{arg}": uncond[name] for name, arg in STOCK_ARGUMENTS[family.name].items()}
    if family.name == "pixart":
        args |= dict(negative_prompt=None, use_resolution_binning=False)
        side = family.sample_shape(1)[-1]
    else:
        side = family.latent_size
    size = side * pipe.vae_scale_factor
    return pipe(**args, height=size, width=size, **kw).images
