"""What ``tools/bench.py`` measures: the rows, the models, their schedules and inputs.

Kept apart from the timing code so that a child process (the peak-memory measurement) can set
up exactly one row the way the parent does; the pipelines and bundles the rows run are in
``bench_pipelines.py``.  Everything is built from configs with fixed seeds (random weights, no
downloads) except the reference model, which is read from ``rstr/reference/digits-dit``.
"""

from __future__ import annotations

import hashlib
import json
import math
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
