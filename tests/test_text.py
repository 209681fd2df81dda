"""Bundles that take prompts: PixArt-alpha (T5) and FLUX (CLIP pooled + T5) with tiny encoders and VAEs.

The bundle's ``Pipeline(prompt=...)`` runs in a fresh process that must not import torch (or
anything of the toolchain); its images must equal the stock diffusers pipeline's from the same
prompts, negative prompt and noise to the fp32 verification tolerance.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from rstr.engines.bundle import Bundle
from rstr.export.build import BuildOptions, build
from tiny import TEXT_LEN, save_model, tiny_flux, tiny_pixart, tiny_text_components, tiny_vae

from rstr._cli import TOOLCHAIN_MODULES
from rstr.errors import BundleError, ModelError
from rstr.schedule import GuidanceSchedule

STEPS, SCALE, B = 3, 3.0, 2
PROMPTS = ["A red fox in the snow", "a photo of a cat on the mat"]


@pytest.fixture(scope="module", params=["pixart", "flux"])
def built(request, tmp_path_factory):
    family = {"pixart": tiny_pixart, "flux": tiny_flux}[request.param]()
    family.vae = tiny_vae(family)
    text = tiny_text_components(family)
    tmp = tmp_path_factory.mktemp(request.param)
    model = save_model(family, tmp / "model", vae=family.vae, text=text)
    GuidanceSchedule.constant(SCALE, STEPS, family=family.name, sampler=family.sampler).save(tmp / "s.json")
    build(BuildOptions(model=model, schedule=tmp / "s.json", out=tmp / "bundle", batch=B, measure=False))
    return family, text, tmp / "bundle"


def stock_images(family, text: dict, noise_seed: int = 0) -> np.ndarray:
    import diffusers

    common = dict(
        prompt=PROMPTS,
        negative_prompt="",
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(noise_seed),
        output_type="np",
        max_sequence_length=TEXT_LEN,
    )
    size = family.image_shape()[0]
    parts = dict(vae=family.vae, transformer=family.transformer, scheduler=family.fresh_scheduler(), **text)
    if family.name == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(**parts)
        return pipe(
            guidance_scale=SCALE, clean_caption=False, use_resolution_binning=False, height=size, width=size, **common
        ).images
    pipe = diffusers.FluxPipeline(**parts)
    return pipe(true_cfg_scale=SCALE, height=size, width=size, **common).images


def test_prompt_images_equal_the_stock_pipeline_without_torch(built, tmp_path):
    family, text, bundle = built
    verification = Bundle.open(bundle).manifest.verification
    assert set(verification.graphs) == {"vae_decoder", *(k for k in text if k.startswith("text_encoder"))}
    assert max(verification.graphs.values()) <= 1e-4
    noise = family.noise(B, torch.Generator().manual_seed(0)).numpy()  # the stock pipeline's own draw
    np.save(tmp_path / "noise.npy", noise)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from rstr.engines import Pipeline

        with Pipeline.load({str(bundle)!r}, backend="onnxruntime-cpu") as pipe:
            out = pipe(prompt={PROMPTS!r}, noise=np.load({str(tmp_path / "noise.npy")!r}))
        np.save({str(tmp_path / "images.npy")!r}, out.images)
        print(json.dumps(sorted(sys.modules)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tokenizers" in modules and "onnxruntime" in modules
    assert sorted({m for m in modules if m.partition(".")[0] in TOOLCHAIN_MODULES}) == []
    got, expected = np.load(tmp_path / "images.npy"), stock_images(family, text)
    assert got.shape == expected.shape == (B, *family.image_shape())
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, f"prompt images differ from the stock pipeline's by {err:.1e}"


def test_prompt_rows_must_match_the_batch(built):
    from rstr.engines import Pipeline

    from rstr.errors import RstrError

    _, _, bundle = built
    with Pipeline.load(bundle, backend="onnxruntime-cpu") as pipe:
        with pytest.raises(RstrError, match="prompt must be a string or 2 strings"):
            pipe(prompt=["one", "two", "three"], seed=0)


def test_text_encoder_without_its_tokenizer_is_one_line(tmp_path):
    import shutil

    family = tiny_pixart()
    model = save_model(family, tmp_path / "model", text=tiny_text_components(family))
    shutil.rmtree(model / "tokenizer")
    with pytest.raises(ModelError, match="cannot load the text encoder or its tokenizer"):
        from rstr.families import load_model

        load_model(model)
    (model / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["NotAModel"]}))
    with pytest.raises(ModelError, match="architectures names 'NotAModel'"):
        from rstr.families import load_model

        load_model(model)


def test_run_writes_a_png_from_a_prompt(built, tmp_path):
    from PIL import Image

    family, _, bundle = built
    out = tmp_path / "x.png"
    argv = ["run", str(bundle), "--prompt", PROMPTS[0], "--negative-prompt", "blue sky", "--backend", "onnxruntime-cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "rstr.export.cli", *argv, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    h, w, _ = family.image_shape()
    assert Image.open(out).size == (B * w, h)


def _edited(bundle, dest, edit=None):
    import shutil

    shutil.copytree(bundle, dest)
    if edit is not None:
        m = json.loads((dest / "manifest.json").read_text())
        edit(m)
        (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize("built", ["pixart"], indirect=True)  # one family suffices: the readers are generic
@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("tampered", "file 'text_encoder.onnx' fails its checksum"),
        ("missing", "file 'text_encoder.onnx' listed in manifest.json is missing"),
        ("unnamed", "text.encoders[0].graph 'text_encoder' is not one of the graphs beside the plan's"),
        ("tokenizer-unlisted", "text.encoders[0].tokenizer 'tokenizers/text_encoder.json' is not listed in files"),
        ("stray-graph", "graphs.text_encoder is run by neither the decoder, a text encoder nor the class table"),
    ],
)
def test_text_graph_missing_or_tampered_is_one_line_in_every_reader(built, tmp_path, case, words, request):
    """Pipeline.load and rstr-export run refuse in one line; rstr-run (the C++ reader) in the same words."""
    _, _, bundle = built
    edits = {
        "unnamed": lambda m: m["graphs"].pop("text_encoder"),
        "tokenizer-unlisted": lambda m: m["files"].pop("tokenizers/text_encoder.json"),
        "stray-graph": lambda m: m.pop("text"),
    }
    copy = _edited(bundle, tmp_path / case, edits.get(case))
    graph = copy / "text_encoder.onnx"
    if case == "tampered":
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 1
        graph.write_bytes(bytes(data))
    elif case == "missing":
        graph.unlink()
    with pytest.raises(BundleError, match=re.escape(words)):
        Bundle.open(copy)
    proc = subprocess.run(
        [sys.executable, "-m", "rstr.export.cli", "run", str(copy), "--prompt", "a fox", "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "x.png").exists()
    rstr_run = request.getfixturevalue("rstr_run")  # skips where the C++ runtime cannot be built
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros(Bundle.open(bundle).sample.concrete(B), np.float32))
    proc = subprocess.run(
        [str(rstr_run), str(copy), "--out", str(tmp_path / "x.npy"), "--noise", str(noise)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
