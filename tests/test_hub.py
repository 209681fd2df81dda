"""Models by Hub id come from the local Hugging Face cache (never downloaded), with the same errors as local paths."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_dit

from rstr.errors import ModelError
from rstr.families import load_model
from rstr.hub import resolve_model
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

ROOT = Path(__file__).resolve().parent.parent
REPO = "tiny-org/tiny-dit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "89abcdef0123456789abcdef0123456789abcdef"


def write_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...]) -> Path:
    """Put ``source``'s files into ``cache`` as huggingface_hub lays out a download: blobs, snapshot symlinks, refs."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A Hub cache (HF_HUB_CACHE) holding REPO at main (fp16 variant included) and at tag v1 (another seed)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for commit, refs, seed in ((COMMIT, ("main",), 0), (COMMIT_V1, ("v1",), 1)):
        family = tiny_dit(learned_sigma=False, num_classes=10)
        if seed:
            torch.manual_seed(seed)
            for p in family.transformer.parameters():
                p.data = torch.randn_like(p) * 0.02
        model = tmp_path / f"model-{seed}"
        family.transformer.save_pretrained(model / "transformer")
        family.scheduler.save_pretrained(model / "scheduler")
        if not seed:
            family.transformer.half().save_pretrained(model / "transformer", variant="fp16")
        write_snapshot(cache, REPO, commit, model, refs)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_resolves_to_the_cached_snapshot_and_loads(cache):
    path = resolve_model(REPO)
    assert path == cache / "models--tiny-org--tiny-dit" / "snapshots" / COMMIT
    from_hub, from_disk = load_model(path), tiny_dit(learned_sigma=False, num_classes=10)
    schedule = GuidanceSchedule.constant(2.0, 3, family="dit", sampler="ddim")
    a, b = (sample(f, schedule, f.labels([1, 2]), generator=torch.Generator().manual_seed(0)) for f in (from_hub, from_disk))
    assert torch.equal(a, b)


def test_revision_picks_the_snapshot(cache):
    assert resolve_model(REPO, revision="v1").name == COMMIT_V1
    assert resolve_model(REPO, revision=COMMIT).name == COMMIT
    with pytest.raises(
        ModelError, match=f"model {REPO} at revision v2 is neither a local directory nor in the Hugging Face cache"
    ):
        resolve_model(REPO, revision="v2")


def test_variant_must_be_cached(cache):
    assert resolve_model(REPO, variant="fp16").name == COMMIT
    with pytest.raises(ModelError, match="has no 'bf16' weights"):
        resolve_model(REPO, variant="bf16")
    with pytest.raises(ModelError, match="has no 'fp16' weights"):
        resolve_model(REPO, revision="v1", variant="fp16")


def test_absent_models_fail_like_absent_paths(cache, tmp_path):
    with pytest.raises(
        ModelError,
        match=r"model other-org/none is neither a local directory nor in the Hugging Face cache .*hf download other-org/none",
    ):
        resolve_model("other-org/none")
    with pytest.raises(ModelError, match="model path .*/not/here does not exist"):
        resolve_model(tmp_path / "not" / "here")
    with pytest.raises(ModelError, match="--revision main applies to Hub ids"):
        resolve_model(tmp_path, revision="main")
    assert resolve_model(tmp_path) == tmp_path


def test_cli_takes_a_hub_id_offline(cache, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, read by a fresh process."""
    GuidanceSchedule.constant(2.0, 3, family="dit", sampler="ddim").save(tmp_path / "s.json")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "rstr.cli", "export-diffusers", "--schedule", str(tmp_path / "s.json")]
    ok = subprocess.run(
        [*run, "--model", REPO, "--out", str(tmp_path / "pipe")], capture_output=True, text=True, env=env, timeout=300
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "pipe" / "model_index.json").is_file() and (tmp_path / "pipe" / "guider" / "guider_config.json").is_file()
    missing = subprocess.run(
        [*run, "--model", "tiny-org/absent", "--out", str(tmp_path / "p2")], capture_output=True, text=True, env=env, timeout=300
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"rstr: error: model tiny-org/absent is neither a local directory nor in the Hugging Face cache ({cache}); rstr does not "
        "download: fetch it with `hf download tiny-org/absent` or give a local diffusers directory"
    ]


def test_info_and_build_take_a_hub_id_offline(cache, tmp_path):
    """`rstr info org/name` and `rstr-export build --model org/name` from the pre-filled cache, offline."""
    GuidanceSchedule.constant(2.0, 3, family="dit", sampler="ddim").save(tmp_path / "s.json")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    info = subprocess.run([sys.executable, "-m", "rstr.cli", "info", REPO], capture_output=True, text=True, env=env, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "DiTTransformer2DModel" in info.stdout
    build = [sys.executable, "-m", "rstr.export.cli", "build", "--model", REPO, "--schedule", str(tmp_path / "s.json")]
    build += ["--out", str(tmp_path / "bundle"), "--no-measure", "--precision", "fp32", "--quiet"]
    done = subprocess.run(build, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["family"] == "dit" and manifest["verification"]["max_rel_error"] <= manifest["verification"]["tolerance"]
