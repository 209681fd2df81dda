"""Shared fixtures and environment-driven skips (markers: slow, gpu, tensorrt, cpp, ray)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Busy-waiting OpenMP threads starve each other on a loaded 2-core machine (25 s vs 3 s for
# one small evaluation); passive waiting changes no result. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    skips = {
        "gpu": (not torch.cuda.is_available(), "no CUDA GPU on this machine"),
        "tensorrt": (not _has("tensorrt"), "TensorRT is not installed (it comes from NVIDIA's package index)"),
        "ray": (not _has("ray"), "ray is not installed (pip install 'rstr[ray]')"),
    }
    for item in items:
        for marker, (skip, reason) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def pixel_dit_bundle(tmp_path_factory) -> Path:
    """One tiny pixel-space DiT bundle (10 classes, batch 2, steps guided/guided/unguided/unguided on the
    schedule's own timesteps, as Stage-1 writes them), built by rstr.export and verified against PyTorch
    on export; shared by the export, engine and C++ tests."""
    import json

    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from rstr.export.build import BuildOptions, build

    from rstr.schedule import GuidanceSchedule

    tmp = tmp_path_factory.mktemp("pixel-dit")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    model.save_pretrained(tmp / "model" / "transformer")
    DDIMScheduler(clip_sample=False).save_pretrained(tmp / "model" / "scheduler")
    meta = {"default_steps": 4, "image": {"channels": 1, "size": 8, "range": [-1.0, 1.0]}}
    (tmp / "model" / "rstr.json").write_text(json.dumps(meta))
    schedule = GuidanceSchedule(
        family="dit",
        sampler="ddim",
        guided=(True, True, False, False),
        scales=(2.5, 1.5, None, None),
        default_steps=4,
        timesteps=(900, 610, 280, 0),
    )
    schedule.save(tmp / "schedule.json")
    out = tmp / "bundle"
    build(BuildOptions(model=tmp / "model", schedule=tmp / "schedule.json", out=out, measure=False, batch=2))
    return out


@pytest.fixture(scope="session")
def rstr_run() -> Path:
    """The C++ runtime's command line, built once per session (tools/build_cpp.sh, incremental)."""
    import cpp_build

    why = cpp_build.missing()
    if why is not None:
        pytest.skip(why)
    return cpp_build.build()


@pytest.fixture(scope="session")
def packed_pixel_bundle(tmp_path_factory) -> Path:
    """A bundle of the reference digits-qwenimage (pixel-space, 2x2-packed latents [B, 16, 4]), batch 2, 3 steps
    on its own timesteps with the first guided, and ``cond.npz`` / ``uncond.npz`` beside it: classes 3 and 7 through the model's class
    table, and its negative rows."""
    import numpy as np
    from rstr.export.build import BuildOptions, build

    from rstr.families import load_model
    from rstr.schedule import GuidanceSchedule

    tmp = tmp_path_factory.mktemp("packed")
    family = load_model("digits-qwenimage")
    first = GuidanceSchedule.first_k(family.default_scale, 3, 1, family=family.name, sampler=family.sampler, default_steps=3)
    schedule = GuidanceSchedule(  # on a grid of its own, as Stage-1 finds them: sigmas 0.95, 0.56, 0.22, then 0
        family=first.family,
        sampler=first.sampler,
        guided=first.guided,
        scales=first.scales,
        default_steps=3,
        timesteps=(950, 560, 220),
    )
    schedule.save(tmp / "schedule.json")
    build(BuildOptions(model=family.path, schedule=tmp / "schedule.json", out=tmp / "bundle", measure=False, batch=2))
    for name, arrays in zip(("cond", "uncond"), family.conditioning_for(torch.tensor([3, 7]))):
        np.savez(tmp / f"{name}.npz", **{k: v.numpy() for k, v in arrays.items()})
    return tmp / "bundle"
