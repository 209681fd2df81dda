"""The family contract is complete: a fifth family, defined here, goes through sample, plan, export and verify.

The throwaway family wraps diffusers' ``SD3Transformer2DModel`` (spatial latents, flow matching,
text embeddings plus a pooled projection), which no generic module of rstr knows.  It joins with
:func:`rstr.families.register_family` and ships a class table, so the class-indexed paths (``rstr
sample --classes``, ``conditioning_for``) run on it too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rstr.engines.bundle import Bundle
from rstr.engines.pipeline import Pipeline
from rstr.export.build import BuildOptions, build
from safetensors.torch import save_file

from rstr.families import FAMILIES, load_model, register_family
from rstr.families.base import Conditioning, SpatialFamily, TensorSpec
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

TEXT_LEN, TEXT_DIM, POOLED = 6, 16, 8


class SD3Family(SpatialFamily):
    """Stable Diffusion 3's transformer: ``[B, C, H, W]`` latents, flow matching, embeddings plus a pooled vector."""

    name = "sd3-test"
    transformer_class = "SD3Transformer2DModel"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    conditioning = "text-embeddings"
    default_steps_fallback = 28
    default_scale_fallback = 7.0

    @classmethod
    def default_scheduler(cls):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=3.0)

    def cond_specs(self) -> list[TensorSpec]:
        cfg = self.transformer.config
        return [
            TensorSpec("encoder_hidden_states", torch.float32, ("batch", TEXT_LEN, int(cfg.joint_attention_dim))),
            TensorSpec("pooled_projections", torch.float32, ("batch", int(cfg.pooled_projection_dim))),
        ]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> Path:
    """A tiny SD3 transformer with its scheduler and a 3-class table, registered for this module only."""
    from diffusers import SD3Transformer2DModel

    register_family(SD3Family)
    directory = tmp_path_factory.mktemp("sd3") / "model"
    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED,
        pos_embed_max_size=8,
    ).save_pretrained(directory / "transformer")
    SD3Family.default_scheduler().save_pretrained(directory / "scheduler")
    (directory / "rstr.json").write_text(json.dumps({"default_steps": 4, "default_scale": 3.0}))
    table = directory / "class_embeddings"
    table.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file(
        {
            "encoder_hidden_states": torch.randn(4, TEXT_LEN, TEXT_DIM, generator=g),
            "pooled_projections": torch.randn(4, POOLED, generator=g),
        },
        str(table / "embeddings.safetensors"),
    )
    (table / "config.json").write_text(
        json.dumps(
            {
                "format": "rstr.class-embeddings/1",
                "num_classes": 3,
                "negative_row": 3,
                "inputs": ["encoder_hidden_states", "pooled_projections"],
            }
        )
    )
    yield directory
    FAMILIES.pop(SD3Family.name)


def test_loader_and_contract(sd3_model):
    family = load_model(sd3_model)
    assert isinstance(family, SD3Family) and family.path == sd3_model.resolve()
    assert (family.num_classes, family.default_scale, family.quality) == (3, 3.0, "teacher")
    cond, uncond = family.conditioning_for(torch.tensor([2, 0]))
    table = family.class_embeddings
    assert torch.equal(cond["pooled_projections"], table.tables["pooled_projections"][[2, 0]])
    assert torch.equal(uncond["encoder_hidden_states"][1], table.tables["encoder_hidden_states"][3])
    schedule = family.constant_cfg()
    assert (schedule.num_steps, schedule.scales[0], schedule.compute_fraction) == (4, 3.0, 1.0)


def test_sample_guided_equals_manual_cfg(sd3_model):
    """The sampler's guided steps combine the family's two passes as ``u + w (c - u)``; unguided steps run B rows."""
    family = load_model(sd3_model)
    cond, uncond = family.conditioning_for(torch.tensor([0, 1]))
    noise = family.noise(2, torch.Generator().manual_seed(0))
    rows: list[int] = []
    handle = family.transformer.register_forward_pre_hook(
        lambda m, args, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    schedule = GuidanceSchedule(
        family=family.name,
        sampler=family.sampler,
        guided=(True, False, True, False),
        scales=(3.0, None, 1.5, None),
        default_steps=4,
    )
    out = sample(family, schedule, cond, uncond=uncond, noise=noise)
    handle.remove()
    assert rows == [4, 2, 4, 2]
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_export_verify_and_run(sd3_model, tmp_path):
    """Plan, export and verification of a family no generic module names; the bundle then runs from conditioning."""
    family = load_model(sd3_model)
    schedule = GuidanceSchedule(
        family=family.name,
        sampler=family.sampler,
        guided=(True, True, False, False),
        scales=(3.0, 2.0, None, None),
        default_steps=4,
    )
    schedule.save(tmp_path / "s.json")
    result = build(BuildOptions(model=sd3_model, schedule=tmp_path / "s.json", out=tmp_path / "bundle", measure=False))
    assert result.verification.max_rel_error <= 1e-4
    assert result.manifest.family == "sd3-test"
    assert [s["batch"] for s in Bundle.open(tmp_path / "bundle").manifest.to_json()["plan"]["steps"]] == [2, 2, 1, 1]
    cond, uncond = family.conditioning_for(torch.tensor([1]))
    to_np = lambda c: {k: v.numpy() for k, v in c.items()}  # noqa: E731
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    with Pipeline.load(tmp_path / "bundle", backend="onnxruntime") as pipe:
        got = pipe(to_np(cond), uncond=to_np(uncond), noise=noise).latents
    expected = sample(family, schedule, cond, uncond=uncond, noise=torch.from_numpy(noise)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_cli_sample_by_class(sd3_model, tmp_path):
    """`rstr sample --classes` works for any family with a class table (the family is registered in the subprocess)."""
    code = (
        "import sys; from test_family_contract import SD3Family; from rstr.families import register_family; "
        "register_family(SD3Family); from rstr.cli import main; sys.argv[0] = 'rstr'; main()"
    )
    out = tmp_path / "x.npy"
    proc = subprocess.run(
        [sys.executable, "-c", code, "sample", "--model", str(sd3_model), "--classes", "2,0", "--steps", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (2, 4, 8, 8)
    bad = subprocess.run(
        [sys.executable, "-c", code, "sample", "--model", str(sd3_model), "--classes", "5", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert bad.returncode == 1 and "class label 5 is out of range" in bad.stderr and "Traceback" not in bad.stderr
