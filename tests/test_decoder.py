"""Bundles with a VAE return images: the decoder graph is verified, and the images equal the stock pipeline's.

Each family gets a directory with a tiny VAE of its class (8x compression like the real ones),
a bundle with a constant-CFG schedule, and the stock diffusers pipeline run from the same noise
and conditioning to images (``output_type="np"``): the bundle's images must match to the fp32
verification tolerance.  Only numpy and ONNX Runtime run the bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from rstr.engines.bundle import Bundle
from rstr.engines.pipeline import Pipeline
from rstr.export.build import BuildOptions, build
from tiny import (
    save_model,
    stock_call,
    stock_pipeline,
    text_conditioning,
    tiny_dit,
    tiny_flux,
    tiny_pixart,
    tiny_qwenimage,
    tiny_vae,
)

from rstr.errors import BundleError, ModelError
from rstr.schedule import GuidanceSchedule

STEPS, SCALE, B = 3, 3.0, 2
MAKERS = {"dit": lambda: tiny_dit(num_classes=1000), "pixart": tiny_pixart, "flux": tiny_flux, "qwenimage": tiny_qwenimage}


@pytest.fixture(scope="module", params=list(MAKERS))
def built(request, tmp_path_factory):
    """(family, its VAE, bundle directory) with a constant-CFG schedule at batch B."""
    family = MAKERS[request.param]()
    vae = family.vae = tiny_vae(family)
    tmp = tmp_path_factory.mktemp(request.param)
    model = save_model(family, tmp / "model", vae=vae)
    GuidanceSchedule.constant(SCALE, STEPS, family=family.name, sampler=family.sampler).save(tmp / "s.json")
    build(BuildOptions(model=model, schedule=tmp / "s.json", out=tmp / "bundle", batch=B, measure=False))
    return family, vae, tmp / "bundle"


def _inputs(family):
    if family.name == "dit":
        return {"class_labels": torch.tensor([1, 7])}, None
    return text_conditioning(family, B, 0), text_conditioning(family, B, 1)


def stock_images(family, vae, cond, uncond) -> np.ndarray:
    """The stock diffusers pipeline's images ``[B, H, W, 3]`` from seed 0 (its own noise draw)."""
    scale = {"guidance_scale": SCALE} if family.name in ("dit", "pixart") else {"true_cfg_scale": SCALE}
    g = torch.Generator().manual_seed(0)
    pipe = stock_pipeline(family, vae)
    return stock_call(pipe, family, cond, uncond, num_inference_steps=STEPS, generator=g, output_type="np", **scale)


def test_bundle_images_equal_the_stock_pipeline(built):
    family, vae, bundle = built
    manifest = Bundle.open(bundle).manifest
    assert manifest.decoder.kind == "vae" and manifest.decoder.graph == "vae_decoder"
    assert manifest.verification.graphs["vae_decoder"] <= 1e-4  # the decoder graph against the PyTorch VAE
    cond, uncond = _inputs(family)
    noise = family.noise(B, torch.Generator().manual_seed(0)).numpy()  # the stock pipeline's own draw
    np_ = lambda d: None if d is None else {k: v.numpy() for k, v in d.items()}  # noqa: E731
    with Pipeline.load(bundle, backend="onnxruntime-cpu") as pipe:
        out = pipe(np_(cond), uncond=np_(uncond), noise=noise)
    expected = stock_images(family, vae, cond, uncond)
    h, w, c = family.image_shape()
    assert out.images.shape == expected.shape == (B, h, w, c)
    err = np.abs(out.images - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"bundle images differ from the stock pipeline's by {err:.1e}"


def test_run_writes_png_of_the_decoded_images(built, tmp_path):
    """Every family: rstr-export run decodes through the bundle's VAE graph and writes the B images side by side."""
    family, _, bundle = built
    if family.name == "dit":
        inputs = ["--class", "1,7"]
    else:  # embeddings in (no text encoders in this bundle): conditioning and its unconditional rows as one .npz
        cond, uncond = _inputs(family)
        arrays = {**{k: v.numpy() for k, v in cond.items()}, **{f"uncond_{k}": v.numpy() for k, v in uncond.items()}}
        np.savez(tmp_path / "cond.npz", **arrays)
        inputs = ["--cond", str(tmp_path / "cond.npz")]
    out = tmp_path / "x.png"
    argv = [sys.executable, "-m", "rstr.export.cli", "run", str(bundle), *inputs, "--backend", "onnxruntime-cpu"]
    proc = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    h, w, c = family.image_shape()
    with Image.open(out) as image:
        assert image.size == (B * w, h) and image.mode == ("RGB" if c == 3 else "L")


@pytest.mark.parametrize("built", ["dit"], indirect=True)  # one family suffices: the reader is generic
def test_decoder_graph_missing_or_tampered_is_refused(built, tmp_path):
    import shutil

    _, _, bundle = built
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    data = bytearray((tampered / "vae_decoder.onnx").read_bytes())
    data[-1] ^= 1
    (tampered / "vae_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="file 'vae_decoder.onnx' fails its checksum"):
        Bundle.open(tampered)
    (tampered / "vae_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="file 'vae_decoder.onnx' listed in manifest.json is missing"):
        Bundle.open(tampered)
    unnamed = tmp_path / "unnamed"
    shutil.copytree(bundle, unnamed)
    m = json.loads((unnamed / "manifest.json").read_text())
    del m["graphs"]["vae_decoder"]
    (unnamed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="decoder.graph 'vae_decoder' is not one of the graphs beside the plan's"):
        Bundle.open(unnamed)


def test_broken_vae_config_is_one_line_and_writes_nothing(tmp_path):
    family = tiny_dit(num_classes=10)
    model = save_model(family, tmp_path / "model", vae=tiny_vae(family))
    (model / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": "eight"}))
    GuidanceSchedule.constant(SCALE, STEPS, family="dit", sampler=family.sampler).save(tmp_path / "s.json")
    cmd = [sys.executable, "-m", "rstr.export.cli", "build", "--model", str(model), "--schedule", str(tmp_path / "s.json")]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("rstr-export: error:") and "cannot load the VAE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
    (model / "vae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelError, match="VAE class 'UNet2DModel' is not the dit family's AutoencoderKL"):
        from rstr.families import load_model

        load_model(model)


def test_half_precision_build_checks_its_decoder_against_an_fp32_vae(tmp_path):
    """An fp16 build's reference decodes with an fp32 copy of the VAE on the CPU (PyTorch's half-precision CPU
    convolutions are ~200x slower); the model's own VAE stays fp16 and the decoder graph passes fp16's tolerance."""
    from rstr.export.verify import TOLERANCE, _fp32_vae_on_cpu

    family = tiny_dit(num_classes=10)
    model = save_model(family, tmp_path / "model", vae=tiny_vae(family))
    GuidanceSchedule.constant(SCALE, STEPS, family="dit", sampler=family.sampler).save(tmp_path / "s.json")
    build(BuildOptions(model=model, schedule=tmp_path / "s.json", out=tmp_path / "b", batch=B, dtype="fp16", measure=False))
    manifest = Bundle.open(tmp_path / "b").manifest
    assert manifest.dtype == "fp16" and 0 < manifest.verification.graphs["vae_decoder"] <= TOLERANCE["fp16"]

    vae = family.vae = tiny_vae(family).half()
    with _fp32_vae_on_cpu(family):
        assert next(family.vae.parameters()).dtype == torch.float32 and family.vae is not vae
    assert family.vae is vae and next(vae.parameters()).dtype == torch.float16


def test_packed_pixel_latents_decode_to_the_familys_images(packed_pixel_bundle):
    """FLUX and Qwen-Image pack 2x2 pixels per token; the runtime unpacks them as the family does (digits-qwenimage)."""
    from rstr.families import load_model

    family = load_model("digits-qwenimage")
    cond, uncond = (dict(np.load(packed_pixel_bundle.parent / f"{name}.npz")) for name in ("cond", "uncond"))
    noise = family.noise(2, torch.Generator().manual_seed(0)).numpy()
    with Pipeline.load(packed_pixel_bundle, backend="onnxruntime-cpu") as pipe:
        result = pipe(cond, uncond=uncond, noise=noise)
    assert result.latents.shape == (2, 16, 4) and result.images.shape == (2, 8, 8, 1)
    want = (family.to_images(torch.from_numpy(result.latents)).clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(result.images, want, atol=1e-6)
