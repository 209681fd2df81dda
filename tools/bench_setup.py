"""What ``tools/bench.py`` measures: the models, their schedules, inputs, pipelines and bundles.

Kept apart from the timing code so that a child process (the peak-memory measurement) can set
up exactly one row the way the parent does.  Everything is built from configs with fixed
seeds (random weights, no downloads) except the reference model, which is read from
``rstr/reference/digits-dit``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEARCH_DIR = ROOT / "docs" / "search"
BENCH_SEED = 0  # image i of a timed batch starts from the noise of seed BENCH_SEED + i

# Rows, in table order: key -> (label, engine, schedule kind, precision).  Schedule kinds: ``cfg`` constant
# CFG at the nominal steps, ``rstr`` the 50%-budget search result, ``rstr30`` the 30% one (docs/search/).
CACHE_DIT_THRESHOLDS = (0.08, 0.16, 0.32)  # DBCache residual_diff_threshold, swept (0.08 is its default)
SCHEDULE_BUDGETS = {"rstr": 0.5, "rstr30": 0.3}
PRECISIONS = ("fp32", "int8-dynamic", "int8", "bf16")  # rstr.export.precision
_ROWS: dict[str, tuple[str, str, str, str]] = {
    "diffusers": ("diffusers pipeline, eager, constant CFG (baseline)", "torch", "cfg", "fp32"),
    "diffusers-compile": ("diffusers pipeline, torch.compile(transformer), constant CFG", "torch", "cfg", "fp32"),
    **{
        f"cache-dit@{t:g}": (
            f"diffusers + cache-dit DBCache (threshold {t:g}, blocks that fit), constant CFG",
            "torch",
            "cfg",
            "fp32",
        )
        for t in CACHE_DIT_THRESHOLDS
    },
    "rstr-torch": ("rstr sampler, PyTorch eager, rstr 50% schedule", "torch", "rstr", "fp32"),
    "ort-cfg": ("rstr bundle, ONNX Runtime CPU, constant CFG, fp32", "ort", "cfg", "fp32"),
    **{
        f"{eng}-{kind}" + ("" if p == "fp32" else f"-{p}"): (
            f"rstr bundle, {'ONNX Runtime CPU' if eng == 'ort' else 'TensorRT'}, rstr {SCHEDULE_BUDGETS[kind]:.0%} schedule, {p}",
            eng,
            kind,
            p,
        )
        for eng in ("ort", "trt")
        for kind in SCHEDULE_BUDGETS
        for p in PRECISIONS
        if not (eng == "trt" and p == "int8-dynamic")  # TensorRT has no dynamic int8 ops
    },
    "trt-cfg": ("rstr bundle, TensorRT, constant CFG, fp32", "trt", "cfg", "fp32"),
}
ROWS = tuple(k for k in _ROWS if not k.startswith("trt")) + tuple(k for k in _ROWS if k.startswith("trt"))
ROW_LABELS = {k: _ROWS[k][0] for k in ROWS}
ROW_ENGINE = {k: _ROWS[k][1] for k in ROWS}
ROW_SCHEDULE = {k: _ROWS[k][2] for k in ROWS}
ROW_PRECISION = {k: _ROWS[k][3] for k in ROWS}
CPU_BF16 = (
    "not run: ONNX Runtime's CPU provider has no bf16 MatMul/Gemm/Add kernels (1.32) and this CPU no AVX512-BF16; "
    "a bf16 bundle runs on TensorRT or ONNX Runtime CUDA (see the trt-*-bf16 rows)"
)


def is_cache_dit(key: str) -> bool:
    return key.startswith("cache-dit")


# ================================================================================ models
@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: a config with random weights (seed 0), or the reference model."""

    key: str
    title: str
    family: str
    shape: str
    steps: int  # nominal steps: constant CFG runs this many, the rstr schedule is a fraction of it
    scale: float  # constant-CFG scale (the reference model's own default_scale wins)
    big_batch: int | None  # the larger batch for images/s (None: batch 1 only)
    config: dict | None = None  # transformer constructor arguments; None = the reference model
    meta: dict = field(default_factory=dict)  # rstr.json extras
    skip: dict = field(default_factory=dict)  # row key -> why it is not run for this model
    quick_steps: int | None = None  # nominal steps under --quick


DIT_XL_STEPS = 4
XL_EXPORT = (
    "not run here: exporting this 3 GB model peaked at 21.9 GB RSS on this 24 GB machine (measured once, "
    "rstr 0.1.0, when it then failed on protobuf's 2 GB limit in `export/graphs.py` `clean()`, since fixed and "
    "tested with a lowered threshold); run it on a machine with more memory"
)
MODELS: dict[str, ModelSpec] = {
    "ref": ModelSpec(
        "ref",
        "reference digits DiT",
        "dit",
        "DiT 4 blocks, hidden 128 (4x32), 8x8x1 pixels, 16 tokens, 10 classes",
        steps=25,
        scale=2.0,
        big_batch=8,
    ),
    "dit-s": ModelSpec(
        "dit-s",
        "DiT-S/2-shaped (random weights)",
        "dit",
        "DiT 12 blocks, hidden 384 (6x64), patch 2, 32x32x4 latents (256 px), 256 tokens, learned sigma, 1000 classes",
        steps=20,
        scale=4.0,
        big_batch=2,
        quick_steps=10,
        config=dict(
            num_attention_heads=6,
            attention_head_dim=64,
            in_channels=4,
            out_channels=8,
            num_layers=12,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
        ),
    ),
    "dit-xl": ModelSpec(
        "dit-xl",
        "DiT-XL/2-shaped (random weights)",
        "dit",
        "DiT 28 blocks, hidden 1152 (16x72), patch 2, 32x32x4 latents (256 px), 256 tokens, learned sigma, 1000 classes",
        steps=DIT_XL_STEPS,
        scale=4.0,
        big_batch=None,
        config=dict(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
        ),
        skip={
            "cache-dit": f"not run: with {DIT_XL_STEPS} steps, DBCache's default 8 warm-up steps (max_warmup_steps=8) never "
            "cache, so it would compute exactly what the diffusers row computes",
            "ort-cfg": XL_EXPORT,
            "ort-rstr": XL_EXPORT,
        },
    ),
    "pixart": ModelSpec(
        "pixart",
        "PixArt-alpha-shaped, small (random weights)",
        "pixart",
        "PixArt 12 blocks, hidden 256 (4x64), patch 2, 16x16x4 latents, 64 tokens, 32 text tokens (dim 512), learned sigma",
        steps=20,
        scale=4.5,
        big_batch=4,
        quick_steps=10,
        config=dict(
            num_attention_heads=4,
            attention_head_dim=64,
            in_channels=4,
            out_channels=8,
            num_layers=12,
            sample_size=16,
            patch_size=2,
            cross_attention_dim=256,
            caption_channels=512,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        ),
        meta={"text_len": 32},
    ),
    "flux": ModelSpec(
        "flux",
        "FLUX.1-shaped, small (random weights)",
        "flux",
        "FLUX 4 double + 8 single blocks, hidden 256 (4x64), 16x16x16 latents packed to 64 tokens, 32 text tokens (dim 256)",
        steps=20,
        scale=4.0,
        big_batch=4,
        quick_steps=10,
        config=dict(
            patch_size=1,
            in_channels=64,
            num_layers=4,
            num_single_layers=8,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=256,
            pooled_projection_dim=128,
            guidance_embeds=False,
            axes_dims_rope=(16, 24, 24),
        ),
        meta={"text_len": 32, "latent_size": 16},
    ),
    "qwen": ModelSpec(
        "qwen",
        "Qwen-Image-shaped, small (random weights)",
        "qwenimage",
        "Qwen-Image 12 blocks, hidden 256 (4x64), 16x16x16 latents packed to 64 tokens, 32 text tokens (dim 256)",
        steps=20,
        scale=4.0,
        big_batch=4,
        quick_steps=10,
        config=dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=12,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=256,
            axes_dims_rope=(16, 24, 24),
        ),
        meta={"text_len": 32, "latent_size": 16},
    ),
}
DEFAULT_MODELS = ("ref", "dit-s", "dit-xl", "pixart", "flux", "qwen")
QUICK_MODELS = ("ref", "dit-s", "pixart", "flux", "qwen")
TRANSFORMER_CLASS = {
    "dit": "DiTTransformer2DModel",
    "pixart": "PixArtTransformer2DModel",
    "flux": "FluxTransformer2DModel",
    "qwenimage": "QwenImageTransformer2DModel",
}


def make_scheduler(family: str):
    """DDIM for DiT/PixArt (the plan needs an affine update: DDIM eta=0), flow-matching Euler for FLUX/Qwen-Image."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family in ("dit", "pixart"):
        return DDIMScheduler(clip_sample=False)
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift_terminal=0.02,
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


REFERENCE: Path | None = None  # --reference; None: rstr's shipped reference model


def reference_dir() -> Path:
    from rstr.families import REFERENCE_MODEL

    return REFERENCE or REFERENCE_MODEL


def model_dir(spec: ModelSpec, work: Path, steps: int, log: Callable[[str], None] = print) -> Path:
    """The model's diffusers directory: the reference model, or a random-weight one made once and cached in ``work``."""
    if spec.config is None:
        path = reference_dir()
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(
                f"the reference model {path} is missing; train it with "
                "`python tools/train_reference.py --out rstr/reference/digits-dit --seed 0`"
            )
        return path
    import diffusers
    import torch

    meta = {"default_steps": steps, **spec.meta}
    path = work / "models" / f"{spec.key}-{_digest([spec.config, meta, diffusers.__version__])}"
    if (path / "rstr.json").is_file():
        return path
    log(f"  making {spec.key} model directory {path} (random weights, seed 0)")
    from rstr._io import atomic_dir

    with atomic_dir(path, force=True) as tmp:
        torch.manual_seed(0)
        model = getattr(diffusers, TRANSFORMER_CLASS[spec.family])(**spec.config)
        model.save_pretrained(tmp / "transformer")
        make_scheduler(spec.family).save_pretrained(tmp / "scheduler")
        (tmp / "rstr.json").write_text(json.dumps(meta))
        del model
    return path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ============================================================================= schedules
def find_searched_schedule(family, explicit: Path | None, budget: float = 0.5) -> tuple[Any, str]:
    """The reference model's searched schedule: ``explicit``, else the best candidate under ``docs/search/``.

    Candidates are the ``rstr.schedule/1`` files there that fit the model (family, sampler,
    default steps) within ``budget`` of constant-CFG compute; the largest such compute fraction
    wins (the search at that budget), ties broken by file name.  ``None`` when there is none.
    """
    from rstr.schedule import GuidanceSchedule

    if explicit is not None:
        s = GuidanceSchedule.load(explicit)
        s.check_fits(family.name, family.sampler)
        return s, str(explicit)
    found = []
    for path in sorted(SEARCH_DIR.rglob("*.json")) if SEARCH_DIR.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != "rstr.schedule/1":
                continue
            s = GuidanceSchedule.from_dict(data, source=str(path))
        except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
            continue
        if (s.family, s.sampler, s.default_steps) == (
            family.name,
            family.sampler,
            family.default_steps,
        ) and s.compute_fraction <= budget + 1e-9:
            found.append((s.compute_fraction, str(path.relative_to(ROOT)), s))
    if not found:
        return None, ""
    found.sort(key=lambda f: (-f[0], f[1]))
    return found[0][2], found[0][1]


def hand_schedule(family, steps: int, scale: float):
    """Stand-in until a searched schedule exists: 60% of the steps, guidance at ``scale`` on the first third of them."""
    from rstr.schedule import GuidanceSchedule

    n = max(2, round(0.6 * steps))
    k = max(1, round(n / 3))
    return GuidanceSchedule.first_k(scale, n, k, family=family.name, sampler=family.sampler, default_steps=steps)


def transfer_schedule(source, family, steps: int):
    """The reference schedule's shape on another model: same relative step positions and compute fraction.

    Step count scales with the nominal steps; guided flags and scales are resampled by relative
    position (``rstr.search.remap``) and, if that overshoots the source's compute fraction,
    trimmed with ``rstr.search.repair``.
    """
    from rstr.search import Genome, SearchSpace, remap, repair

    n = max(2, min(steps, round(source.num_steps * steps / source.default_steps)))
    genome = Genome(source.guided, tuple(s if s is not None else 1.0 for s in source.scales))
    genome = remap(genome, n)
    max_passes = max(n, math.floor(source.compute_fraction * 2 * steps + 1e-9))
    genome = repair(genome, SearchSpace(default_steps=steps, max_passes=max_passes, step_counts=(n,), w_max=10.0))
    return genome.schedule(family.name, family.sampler, steps)


# ================================================================================ inputs
@dataclass
class Inputs:
    """One batch: per-image seeded noise (as the stock pipelines draw it) and conditioning, torch and numpy."""

    batch: int
    seeds: list[int]
    noise: Any  # torch [B, ...]
    cond: dict
    uncond: dict | None
    labels: list[int] | None = None

    @property
    def noise_np(self) -> np.ndarray:
        return self.noise.numpy()

    def np(self, which: str) -> dict | None:
        d = self.cond if which == "cond" else self.uncond
        return None if d is None else {k: v.numpy() for k, v in d.items()}


def make_inputs(family, batch: int, seed_start: int = BENCH_SEED) -> Inputs:
    import torch
    from rstr.export.verify import example_inputs

    from rstr.evaluate import noise_for_seeds

    seeds = list(range(seed_start, seed_start + batch))
    noise = noise_for_seeds(family, seeds)
    cond, uncond = example_inputs(family, batch)
    to_t = lambda d: None if d is None else {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    labels = [int(x) for x in cond["class_labels"]] if family.name == "dit" else None
    return Inputs(batch, seeds, noise, to_t(cond), to_t(uncond), labels)


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
    warm-up of a fifth of the steps, and ``threshold`` from :data:`CACHE_DIT_THRESHOLDS`.
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
