"""The shipped reference model, seed ranges and the evaluation code path."""

from __future__ import annotations

import json

import pytest
import torch

from rstr.errors import RstrError
from rstr.evaluate import evaluate, noise_for_seeds, sample_grid
from rstr.families import REFERENCE_MODEL, load_model
from rstr.schedule import GuidanceSchedule
from rstr.seeds import CALIBRATION_SEEDS, HELD_OUT_SEEDS, SEARCH_SEEDS, SeedRange, check_disjoint, eval_seeds


@pytest.fixture(scope="module")
def family():
    return load_model()


def _sched(scale: float | None, steps: int) -> GuidanceSchedule:
    kw = dict(family="dit", sampler="ddim", default_steps=25)
    return GuidanceSchedule.conditional_only(steps, **kw) if scale is None else GuidanceSchedule.constant(scale, steps, **kw)


# ------------------------------------------------------------------------------- the model
def test_reference_model_loads_by_default(family):
    assert family.name == "dit"
    assert family.num_classes == 10
    assert family.sample_shape(1) == (1, 1, 8, 8)
    assert not family.learned_sigma
    assert family.sampler == "ddim"
    assert family.default_steps == 25
    assert family.scheduler.config.timestep_spacing == "leading"
    assert family.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert sum(p.numel() for p in family.transformer.parameters()) < 2_000_000


def test_reference_metadata_and_null_class(family):
    meta = json.loads((REFERENCE_MODEL / "rstr.json").read_text())
    assert meta["name"] == "digits-dit" and meta["family"] == "dit" and meta["num_classes"] == 10
    assert meta["image"] == {"channels": 1, "size": 8, "range": [-1, 1]}
    assert (REFERENCE_MODEL / meta["classifier"]).is_file()
    assert 1.0 <= meta["default_scale"] <= 3.0
    # diffusers adds one row to every label table for class dropout: row 10 is the null class,
    # which is what DiTFamily feeds on the unconditional branch.
    tables = [m.embedding_table for m in family.transformer.modules() if type(m).__name__ == "LabelEmbedding"]
    assert tables and all(t.num_embeddings == 11 for t in tables)
    uncond = family.unconditional(family.labels([3, 7]))
    assert uncond["class_labels"].tolist() == [10, 10]


def test_committed_model_is_small():
    total = sum(p.stat().st_size for p in REFERENCE_MODEL.rglob("*") if p.is_file())
    assert total < 8 * 2**20


# ------------------------------------------------------------------------------ seed ranges
def test_seed_pools_are_disjoint():
    check_disjoint(SEARCH_SEEDS, CALIBRATION_SEEDS, HELD_OUT_SEEDS)
    assert HELD_OUT_SEEDS.start == 1_000_000


def test_overlapping_seed_ranges_raise():
    a, b = SeedRange(0, 100), SeedRange(99, 200)
    assert a.overlaps(b) and not a.overlaps(SeedRange(100, 200))
    with pytest.raises(RstrError, match=r"\[0, 100\).*\[99, 200\)"):
        check_disjoint(a, SeedRange(100, 200), b)
    with pytest.raises(RstrError, match="not inside"):
        eval_seeds(99_990, 10, 2).require_within(SEARCH_SEEDS)
    with pytest.raises(RstrError, match="empty"):
        SeedRange(5, 5)
    assert len(eval_seeds(10, 40, 2)) == 80 and 89 in eval_seeds(10, 40, 2) and 90 not in eval_seeds(10, 40, 2)


def test_same_seeds_give_identical_noise(family):
    a = noise_for_seeds(family, range(100, 110))
    b = noise_for_seeds(family, SeedRange(100, 110))
    assert torch.equal(a, b)
    assert torch.equal(noise_for_seeds(family, range(105, 110)), a[5:])  # independent of batching
    assert not torch.equal(noise_for_seeds(family, range(110, 120)), a)


# ------------------------------------------------------------------------------ evaluation
def test_small_evaluation_is_sane_and_reproducible(family):
    s = _sched(1.5, 8)
    r1 = evaluate(family, s, num=40, groups=2, seed_start=HELD_OUT_SEEDS.start, progress=False, batch_size=25)
    r2 = evaluate(family, s, num=40, groups=2, seed_start=HELD_OUT_SEEDS.start, progress=False)
    assert r1.fd == r2.fd and r1.accuracy_per_group == r2.accuracy_per_group  # batching does not matter
    assert len(r1.fd) == 2 and all(0 < fd < 50 for fd in r1.fd)
    assert r1.accuracy >= 0.9
    assert r1.passes_per_image == 16 and r1.compute_fraction == pytest.approx(16 / 50)
    assert r1.seeds == (HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + 80)
    assert r1.seconds > 0 and "passes/image" in r1.summary()
    assert set(r1.to_dict()) >= {"fd", "fd_mean", "fd_std", "accuracy", "passes_per_image", "compute_fraction", "seconds"}


def test_over_guidance_hurts_the_frechet_distance(family):
    # Robust at small N: w=4 is far worse than the default scale (FD ~10x at 25 steps).
    kw = dict(num=100, groups=1, seed_start=HELD_OUT_SEEDS.start, progress=False)
    good = evaluate(family, _sched(float(family.meta["default_scale"]), 8), **kw)
    over = evaluate(family, _sched(4.0, 8), **kw)
    assert over.fd_mean > 2 * good.fd_mean
    assert over.accuracy >= 0.95  # strong guidance keeps (or raises) class accuracy


def test_evaluate_refuses_bad_requests(family):
    s = _sched(None, 4)
    with pytest.raises(RstrError, match="num"):
        evaluate(family, s, num=1, groups=1, seed_start=0, progress=False)
    with pytest.raises(RstrError, match="reference"):
        evaluate(family, s, num=10, groups=1, seed_start=0, extractor=object(), progress=False)


def test_sample_grid_writes_a_png(family, tmp_path):
    r = evaluate(family, _sched(None, 4), num=20, groups=1, seed_start=0, progress=False, keep_images=True)
    assert r.images.shape == (20, 1, 8, 8) and r.labels.tolist() == [i % 10 for i in range(20)]
    path = sample_grid(r.images, r.labels, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
