"""Output size and prompt length as build options, and the build's one-line refusals of what cannot run.

``rstr-export build --height/--width/--max-text-len`` sets what ``rstr.json`` used to: the bundle's
shapes follow, the decoder gives images of that size, and ``rstr-export verify`` loads the model
with the recorded options.  A size the model cannot make, a dtype it cannot run in and a broken
text encoder are each refused in one line with exit 1 before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rstr.engines.bundle import Bundle
from rstr.export.build import BuildOptions, build
from tiny import save_model, tiny_dit, tiny_flux, tiny_pixart, tiny_text_components, tiny_vae

from rstr.errors import ModelError
from rstr.families import load_model
from rstr.schedule import GuidanceSchedule

STEPS, SCALE = 2, 3.0


def _model(family, tmp, **parts):
    model = save_model(family, tmp / "model", **parts)
    GuidanceSchedule.constant(SCALE, STEPS, family=family.name, sampler=family.sampler).save(tmp / "s.json")
    return model


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rstr.export.cli", *args], capture_output=True, text=True, timeout=600)


def _refused(proc: subprocess.CompletedProcess, words: str, out) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rstr-export: error:") and words in lines[0], proc.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_flux_bundle_at_another_size_and_text_length_verifies(tmp_path):
    family = tiny_flux()
    family.vae = tiny_vae(family)
    model = _model(family, tmp_path, vae=family.vae)  # rstr.json: latent_size 8 (64 px), text_len 8
    opts = BuildOptions(model=model, schedule=tmp_path / "s.json", out=tmp_path / "b", measure=False)
    build(BuildOptions(**{**vars(opts), "height": 32, "width": 32, "max_text_len": 5}))
    manifest = Bundle.open(tmp_path / "b").manifest
    assert manifest.sample.shape == (1, (32 // 8 // 2) ** 2, 4 * family.latent_channels)  # 2x2-packed 4x4 latents
    text = next(d for d in manifest.conditioning.inputs if d.name == "encoder_hidden_states")
    assert text.shape[1] == 5
    assert manifest.graphs["vae_decoder"].outputs[0].shape[1:] == (32, 32, 3)
    assert manifest.provenance.size == {"height": 32, "width": 32, "max_text_len": 5}
    proc = _cli("verify", str(tmp_path / "b"), "--model", str(model), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["passed"] is True


@pytest.mark.parametrize(
    ("make", "kwargs", "words"),
    [
        (tiny_flux, {"height": 0, "width": 0}, "--height 0 must be a positive number"),
        (tiny_flux, {"height": 40, "width": 40}, "--height 40 must be a multiple of 16 for the flux model"),
        (tiny_flux, {"height": 64, "width": 32}, "--height 64 --width 32: give both, equal"),
        (tiny_flux, {"height": 64}, "--height 64 --width None: give both, equal"),
        (tiny_flux, {"max_text_len": -3}, "--max-text-len -3 must be a positive number"),
        (lambda: tiny_dit(num_classes=10), {"max_text_len": 8}, "the dit model takes no prompts"),
        (
            lambda: tiny_dit(num_classes=10),
            {"height": 128, "width": 128},
            "the dit model's transformer makes 64 x 64 images only",
        ),
        (tiny_pixart, {"height": 32, "width": 32}, "the pixart model's transformer makes 64 x 64 images only"),
    ],
)
def test_size_the_model_cannot_make_is_one_line(make, kwargs, words, tmp_path):
    family = make()
    model = save_model(family, tmp_path / "model", vae=tiny_vae(family))
    with pytest.raises(ModelError, match=words.replace("(", r"\(")):
        load_model(model, **kwargs)


def test_build_refuses_a_bad_size_in_one_line_and_writes_nothing(tmp_path):
    family = tiny_flux()
    model = _model(family, tmp_path, vae=tiny_vae(family))
    out = tmp_path / "b"
    common = ["build", "--model", str(model), "--schedule", str(tmp_path / "s.json"), "--out", str(out), "--no-measure"]
    _refused(_cli(*common, "--height", "24", "--width", "24"), "--height 24 must be a multiple of 16", out)
    assert "--max-text-len" in _cli("build", "--help").stdout


def test_dtype_the_model_cannot_run_in_is_one_line(tmp_path):
    family = tiny_dit(num_classes=10)
    with torch.no_grad():  # weights far past fp16's range (65504): the model overflows in fp16, runs in fp32
        for p in family.transformer.parameters():
            p.mul_(1e3)
    model = _model(family, tmp_path)
    out = tmp_path / "b"
    common = ["build", "--model", str(model), "--schedule", str(tmp_path / "s.json"), "--out", str(out), "--no-measure"]
    _refused(_cli(*common, "--dtype", "fp16"), "the dit model gives non-finite outputs in fp16 (overflow); use --dtype fp32", out)
    _refused(_cli(*common, "--dtype", "fp8"), "dtype 'fp8' is not one of fp32, fp16, bf16", out)


def test_broken_text_encoder_config_is_one_line_and_writes_nothing(tmp_path):
    family = tiny_pixart()
    model = _model(family, tmp_path, text=tiny_text_components(family))
    (model / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"], "d_model": "wide"}))
    out = tmp_path / "b"
    proc = _cli("build", "--model", str(model), "--schedule", str(tmp_path / "s.json"), "--out", str(out), "--no-measure")
    _refused(proc, "cannot load the text encoder or its tokenizer", out)
