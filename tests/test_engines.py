"""Python runtime: Pipeline on ONNX Runtime (CPU) equals the PyTorch sampler; fallback; bad inputs."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from rstr.engines import Bundle, Pipeline
from rstr.engines.base import InputError
from rstr.export.verify import rel

from rstr.errors import BackendUnavailable, RstrError
from rstr.families import load_model
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

NO_TENSORRT = importlib.util.find_spec("tensorrt") is None


@pytest.fixture(scope="module")
def pipe(pixel_dit_bundle):
    with Pipeline.load(pixel_dit_bundle, backend="onnxruntime-cpu") as p:
        yield p


def test_pipeline_equals_pytorch_sampler(pipe, pixel_dit_bundle):
    bundle = Bundle.open(pixel_dit_bundle)
    family = load_model(bundle.manifest.provenance.model)
    schedule = GuidanceSchedule.load(pixel_dit_bundle / "schedule.json")
    noise = pipe.noise(seed=3)
    out = pipe({"class_labels": [4, 9]}, noise=noise)
    expected = sample(family, schedule, family.labels([4, 9]), noise=torch.from_numpy(noise)).numpy()
    assert rel(out.latents, expected) <= 1e-4
    assert out.images.shape == (2, 8, 8, 1) and 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_seed_is_reproducible_and_thread_safe(pipe):
    first = pipe({"class_labels": [1, 2]}, seed=7).latents
    results = []
    threads = [threading.Thread(target=lambda: results.append(pipe({"class_labels": [1, 2]}, seed=7).latents)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(first, r) for r in results)


def test_calls_do_not_share_state(pipe):
    """The runner reuses its device buffers: a result must survive the next call, and a call
    must not depend on the one before it."""
    a = pipe({"class_labels": [3, 5]}, seed=11).latents
    a_kept = a.copy()
    b = pipe({"class_labels": [7, 0]}, seed=12).latents
    assert np.array_equal(a, a_kept) and not np.allclose(a, b)
    assert np.array_equal(pipe({"class_labels": [3, 5]}, seed=11).latents, a_kept)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"conditioning": {"class_labels": [1, 2]}, "noise": np.zeros((2, 1, 4, 4), np.float32)},
            "noise has shape (2, 1, 4, 4), expected (2, 1, 8, 8)",
        ),
        ({"conditioning": {"class_labels": [1]}, "seed": 0}, "class_labels has shape (1,), expected (2,)"),
        ({"conditioning": {"class_labels": [1.5, 2.0]}, "seed": 0}, "expected integers"),
        ({"conditioning": {"class_labels": [1, 10]}, "seed": 0}, "class label 10 is out of range"),
        ({"conditioning": {"class_labels": [1, 2]}, "noise": np.full((2, 1, 8, 8), np.nan, np.float32)}, "noise contains NaN"),
        ({"conditioning": {"labels": [1, 2]}, "seed": 0}, "missing ['class_labels']"),
        ({"conditioning": {"class_labels": [1, 2]}}, "exactly one of seed= or noise="),
    ],
)
def test_bad_inputs_raise_typed_errors(pipe, kwargs, message):
    conditioning = kwargs.pop("conditioning")
    with pytest.raises(RstrError) as err:
        pipe(conditioning, **kwargs)
    assert message in str(err.value)
    if "seed= or noise=" not in message:
        assert isinstance(err.value, InputError)


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed: the fallback path is not taken")
def test_auto_falls_back_to_onnxruntime_with_one_logged_line(pixel_dit_bundle, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a notice, not a Python warning with its source line
        with caplog.at_level(logging.WARNING, logger="rstr"):
            p = Pipeline.load(pixel_dit_bundle, backend="auto")
    assert p.backend.startswith("onnxruntime")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "falling back to ONNX Runtime" in line and "\n" not in line
    p.close()
    with pytest.raises(BackendUnavailable):
        Pipeline.load(pixel_dit_bundle, backend="tensorrt")


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed")
def test_cli_backend_tensorrt_is_one_line_exit_1(pixel_dit_bundle, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rstr.export.cli",
            "run",
            str(pixel_dit_bundle),
            "--class",
            "1,2",
            "--backend",
            "tensorrt",
            "--out",
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rstr-export: error:") and "TensorRT" in lines[0]
    assert not (tmp_path / "x.npy").exists()


def test_cli_run_writes_png_and_refuses_bad_label(pixel_dit_bundle, tmp_path):
    with warnings.catch_warnings():
        ok = subprocess.run(
            [
                sys.executable,
                "-m",
                "rstr.export.cli",
                "run",
                str(pixel_dit_bundle),
                "--class",
                "3,4",
                "--backend",
                "onnxruntime",
                "--out",
                str(tmp_path / "x.png"),
            ],
            capture_output=True,
            text=True,
        )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rstr.export.cli",
            "run",
            str(pixel_dit_bundle),
            "--class",
            "3,42",
            "--backend",
            "onnxruntime",
            "--out",
            str(tmp_path / "y.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "class label 42 is out of range" in bad.stderr


def test_missing_file_refused(pixel_dit_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(pixel_dit_bundle, copy)
    (copy / "denoiser.onnx").unlink()
    with pytest.raises(RstrError, match="file 'denoiser.onnx' listed in manifest.json is missing"):
        Pipeline.load(copy, backend="onnxruntime")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["plan"]["steps"][2].update(batch=4), "plan.steps[2].batch is 4 but an unguided step runs 2 rows at batch 2"),
        (lambda m: m["plan"]["steps"][0].update(scale=None), "plan.steps[0].scale is null on a guided step"),
        (lambda m: m["plan"].update(num_steps=5), "plan.num_steps is 5 but the steps give 4"),
        (lambda m: m["plan"].update(passes_per_image=8), "plan.passes_per_image is 8 but the steps give 6"),
        (lambda m: m["sample"].update(shape=[3, 1, 8, 8]), "sample.shape [3, 1, 8, 8] must start with the batch, 2"),
        (lambda m: m["conditioning"].update(unconditional={}), "conditioning.unconditional has no rule for input 'class_labels'"),
    ],
)
def test_manifest_rules_beyond_the_schema(pixel_dit_bundle, edit, message):
    """What a schema cannot state is checked by Manifest.from_json, one line each; the schema itself passes these."""
    import json

    from rstr.engines import schema
    from rstr.engines.manifest import Manifest

    from rstr.errors import BundleError

    data = json.loads((pixel_dit_bundle / "manifest.json").read_text())
    edit(data)
    assert schema.check(data, "bundle") is None
    with pytest.raises(BundleError) as err:
        Manifest.from_json(data)
    assert message in str(err.value) and "\n" not in str(err.value)
