"""What the rows of ``tools/bench.py`` run: the stock diffusers pipelines (eager, ``torch.compile``,
cache-dit) and the rstr bundles (export, torch-free inputs, TensorRT availability).

Split from ``bench_setup.py`` (the models, schedules and inputs they run on); like it, kept
apart from the timing code so that a memory child process sets up one row the way the parent does.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_setup import BENCH_SEED, Inputs


# ============================================================================= pipelines
def identity_vae():
    """A VAE whose decode is the identity: DiTPipeline always decodes, so this times the denoising loop only."""
    import torch
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput

    class IdentityVAE(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, scaling_factor: float = 1.0):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1), persistent=False)  # gives the pipeline a device and dtype

        def decode(self, z, return_dict: bool = True):
            return DecoderOutput(sample=z) if return_dict else (z,)

    return IdentityVAE()


def remap_null_class(transformer, num_classes: int) -> None:
    """DiTPipeline hard-codes the null class as 1000; map it to this model's null class (a pre-hook, no other change)."""
    import torch

    def hook(module, args, kwargs):
        labels = kwargs.get("class_labels")
        if labels is not None:
            kwargs["class_labels"] = torch.where(labels == 1000, torch.full_like(labels, num_classes), labels)
        return args, kwargs

    transformer.register_forward_pre_hook(hook, with_kwargs=True)


def stock_pipeline(family, transformer):
    """The family's stock diffusers pipeline around ``transformer``, no text encoders, progress bar off."""
    import diffusers

    sched = family.fresh_scheduler()
    if family.name == "dit":
        if family.num_classes != 1000:
            remap_null_class(transformer, family.num_classes)
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=identity_vae(), scheduler=sched)
    elif family.name == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=sched
        )
    elif family.name == "flux":
        pipe = diffusers.FluxPipeline(
            scheduler=sched,
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
    else:
        pipe = diffusers.QwenImagePipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_pipeline(pipe, family, inputs: Inputs, steps: int, scale: float):
    """One stock-pipeline generation, constant CFG, from the same noise and conditioning as every other row.

    DiTPipeline draws its own noise: it gets one generator per image, seeded like
    ``rstr.evaluate.noise_for_seeds``, so its noise is identical.  It returns decoded images,
    here ``(x / 2 + 0.5).clamp(0, 1)`` of the final latents (identity VAE); the others return latents.
    """
    import torch

    if family.name == "dit":
        gens = [torch.Generator().manual_seed(s) for s in inputs.seeds]
        return pipe(
            class_labels=inputs.labels, guidance_scale=scale, num_inference_steps=steps, generator=gens, output_type="pt"
        ).images
    c, u = inputs.cond, inputs.uncond
    if family.name == "pixart":
        px = family.sample_shape(1)[-1] * 8
        return pipe(
            negative_prompt=None,
            prompt_embeds=c["encoder_hidden_states"],
            prompt_attention_mask=c["encoder_attention_mask"],
            negative_prompt_embeds=u["encoder_hidden_states"],
            negative_prompt_attention_mask=u["encoder_attention_mask"],
            guidance_scale=scale,
            num_inference_steps=steps,
            latents=inputs.noise.clone(),
            output_type="latent",
            use_resolution_binning=False,
            height=px,
            width=px,
        ).images
    px = family.latent_size * 8
    if family.name == "flux":
        return pipe(
            prompt_embeds=c["encoder_hidden_states"],
            pooled_prompt_embeds=c["pooled_projections"],
            negative_prompt_embeds=u["encoder_hidden_states"],
            negative_pooled_prompt_embeds=u["pooled_projections"],
            true_cfg_scale=scale,
            num_inference_steps=steps,
            height=px,
            width=px,
            latents=inputs.noise.clone(),
            output_type="latent",
        ).images
    return pipe(
        prompt_embeds=c["encoder_hidden_states"],
        prompt_embeds_mask=c["encoder_hidden_states_mask"],
        negative_prompt_embeds=u["encoder_hidden_states"],
        negative_prompt_embeds_mask=u["encoder_hidden_states_mask"],
        true_cfg_scale=scale,
        num_inference_steps=steps,
        height=px,
        width=px,
        latents=inputs.noise.clone(),
        output_type="latent",
    ).images


def cache_dit_version() -> str | None:
    try:
        import importlib.metadata as md

        return md.version("cache-dit")
    except Exception:  # noqa: BLE001
        return None


def cache_dit_config(family, steps: int, threshold: float) -> dict:
    """DBCache settings that let cache-dit cache on this model: blocks that fit, a warm-up that leaves steps to cache.

    Its defaults (8 front compute blocks, 8 warm-up steps, threshold 0.08) refuse models with fewer
    than 8 blocks and, at 20 steps, cached nothing on DiT-S/2 (the earlier benchmark).  Here: a
    quarter of the blocks (at least 1, at most its default 8) computed in front, none behind, a
    warm-up of a fifth of the steps, and ``threshold`` from :data:`bench_setup.CACHE_DIT_THRESHOLDS`.
    """
    blocks = len(family.blocks())
    return {
        "Fn_compute_blocks": max(1, min(8, blocks // 4)),
        "Bn_compute_blocks": 0,
        "residual_diff_threshold": threshold,
        "max_warmup_steps": max(1, steps // 5),
    }


def cache_dit_pipeline(family, steps: int, threshold: float, copy_transformer: bool = True):
    """A stock pipeline with ``cache_dit.enable_cache`` and :func:`cache_dit_config`.

    cache-dit patches the transformer it is given, so next to the other rows it gets its own
    copy (``copy_transformer``); a process measuring only this row uses the model itself.
    """
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import cache_dit

    pipe = stock_pipeline(family, copy.deepcopy(family.transformer) if copy_transformer else family.transformer)
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**cache_dit_config(family, steps, threshold)))
    return pipe


def compiled_pipeline(family, copy_transformer: bool = True):
    """The stock pipeline with ``torch.compile`` on its transformer (inductor, default mode): what a PyTorch user does."""
    import torch

    transformer = copy.deepcopy(family.transformer) if copy_transformer else family.transformer
    pipe = stock_pipeline(family, transformer)
    pipe.transformer = torch.compile(transformer)
    return pipe


def cache_dit_unavailable(family) -> str | None:
    """Why cache-dit cannot run here, or None."""
    if cache_dit_version() is None:
        return "cache-dit is not installed (`pip install cache-dit`; it does not change torch)"
    return None


def cache_dit_stats(pipe) -> dict:
    import cache_dit

    out = {}
    for s in cache_dit.summary(pipe, details=False, logging=False) or []:
        out.setdefault("cached_steps", len(s.cached_steps or []))
        out.setdefault("cfg_cached_steps", len(s.cfg_cached_steps or []))
    return out


# =============================================================================== bundles
def build_bundle(
    model: Path,
    schedule,
    out: Path,
    log: Callable[[str], None],
    backend: str = "onnxruntime",
    rebuild: bool = False,
    precision: str = "fp32",
):
    """Export (or reuse a cached) batch-1 bundle of ``model`` under ``schedule`` at ``precision``; returns the opened Bundle.

    ``precision`` is given explicitly (never ``auto``): the bundle ships at it and its precision
    gate record (FD against fp32 on gate seeds for models with the digits metrics, denoiser
    timing) is in its manifest summary.
    """
    from rstr.engines.bundle import Bundle
    from rstr.export.build import BuildOptions, build

    from rstr.errors import BundleError

    if out.is_dir() and not rebuild:
        try:
            return Bundle.open(out)
        except BundleError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    sched_path = out.parent / f"{out.name}.schedule.json"
    schedule.save(sched_path)
    log(f"  exporting bundle {out.name} ({schedule.describe()}, {precision})")
    # The build logs to logging.getLogger("rstr"), which the benchmark leaves unconfigured: warnings only.
    build(
        BuildOptions(
            model=model, schedule=sched_path, out=out, measure=False, batch=1, force=True, backend=backend, precision=precision
        )
    )
    return Bundle.open(out)


def bundle_inputs_np(bundle, batch: int, seed: int = BENCH_SEED) -> tuple[np.ndarray, dict, dict | None]:
    """Torch-free inputs for a bundle (memory children): normal noise, labels ``i % classes`` or random embeddings."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(bundle.batched_sample.concrete(batch), dtype=np.float32)
    num_classes = bundle.manifest.conditioning.num_classes
    if num_classes is not None:
        return noise, {"class_labels": np.arange(batch, dtype=np.int64) % num_classes}, None
    pair = []
    for _ in range(2):
        c = {}
        for d in bundle.cond_inputs:
            shp = d.concrete(batch)
            c[d.name] = np.ones(shp, np.float32) if d.name.endswith("mask") else rng.standard_normal(shp, dtype=np.float32)
        pair.append(c)
    return noise, pair[0], pair[1]


def tensorrt_unavailable() -> str | None:
    """Why the TensorRT rows cannot run here, or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU on this machine (TensorRT needs one)"
    except ImportError:
        return "torch is not installed"
    from rstr.errors import BackendUnavailable

    try:
        from rstr.engines.tensorrt.cuda import load_tensorrt

        load_tensorrt()
    except BackendUnavailable as why:
        return str(why)
    return None
