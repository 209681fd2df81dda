"""C++ runtime (engines/cpp): rstr-run against the Python ONNX Runtime runner, and bad inputs.

The module builds the project once with tools/build_cpp.sh (ONNX Runtime headers from Debian,
the library from the onnxruntime wheel) and exports one tiny bundle with rstr.export: a
random pixel-space DiT (1 channel, 8x8, 10 classes, so the bundle's decoder is "pixels"),
batch 2, a sparse schedule of 2 guided and 2 unguided DDIM steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cpp_build import BUILD, INSTALL, ROOT

pytestmark = pytest.mark.cpp

BATCH = 2
NUM_CLASSES = 10


# ------------------------------------------------------------------------------ fixtures
# rstr_run (the built C++ command line) comes from tests/conftest.py.
@pytest.fixture(scope="module")
def bundle(pixel_dit_bundle) -> Path:
    """The shared pixel-space tiny DiT bundle (tests/conftest.py), batch 2, 10 classes."""
    return pixel_dit_bundle


@pytest.fixture(scope="module")
def noise(bundle) -> Path:
    path = bundle.parent / "noise.npy"
    np.save(path, np.random.default_rng(0).standard_normal((BATCH, 1, 8, 8), dtype=np.float32))
    return path


def run(exe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


def python_latents(bundle: Path, noise: np.ndarray, labels: list[int]) -> np.ndarray:
    from rstr.engines.bundle import Bundle
    from rstr.engines.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(Bundle.open(bundle)) as runner:
        return runner.infer(noise, {"class_labels": np.array(labels, dtype=np.int64)})


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# --------------------------------------------------------------------------------- parity
def test_latents_match_python_onnxruntime(rstr_run, bundle, noise, tmp_path):
    out, png = tmp_path / "latents.npy", tmp_path / "image.png"
    proc = run(rstr_run, bundle, "--out", out, "--png", png, "--class", "3,7", "--noise", noise)
    assert proc.returncode == 0, proc.stderr
    assert "4 steps (2 guided)" in proc.stdout
    got = np.load(out)
    want = python_latents(bundle, np.load(noise), [3, 7])
    assert got.dtype == np.float32 and got.shape == want.shape == (BATCH, 1, 8, 8)
    assert rel(got, want) <= 1e-6

    from PIL import Image

    with Image.open(png) as image:  # B images side by side, upscaled 8x
        assert image.mode == "L" and image.size == (BATCH * 8 * 8, 8 * 8)
        pixels = np.asarray(image)
    expected = np.clip((want[1, 0] + 1) / 2, 0, 1) * 255
    assert np.abs(pixels[::8, 8 * 8 :: 8].astype(np.float32) - expected).max() <= 1.0


def test_cond_file_equals_class_flag(rstr_run, bundle, noise, tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.array([3, 7], dtype=np.int64))
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert run(rstr_run, bundle, "--out", a, "--class", "3,7", "--noise", noise).returncode == 0
    proc = run(rstr_run, bundle, "--out", b, "--cond", f"class_labels={labels}", "--noise", noise)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(a), np.load(b))


def test_seed_is_reproducible(rstr_run, bundle, tmp_path):
    outs = [tmp_path / f"{i}.npy" for i in range(3)]
    for out, seed in zip(outs, (5, 5, 6)):
        proc = run(rstr_run, bundle, "--out", out, "--class", "1", "--seed", seed)
        assert proc.returncode == 0, proc.stderr
    first, again, other = (np.load(p) for p in outs)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_seed_draws_the_same_noise_as_python(rstr_run, bundle, tmp_path):
    """rstr-run --seed S draws rstr.engines.noise.standard_normal(S) exactly: the latents equal those from
    that noise given with --noise, and match the Python runtime's Pipeline(seed=S)."""
    from rstr.engines import Pipeline
    from rstr.engines.noise import standard_normal

    seeded, given = tmp_path / "seeded.npy", tmp_path / "given.npy"
    np.save(tmp_path / "noise.npy", standard_normal(2**40 + 5, (BATCH, 1, 8, 8)))
    assert run(rstr_run, bundle, "--out", seeded, "--class", "3,7", "--seed", 2**40 + 5).returncode == 0
    assert run(rstr_run, bundle, "--out", given, "--class", "3,7", "--noise", tmp_path / "noise.npy").returncode == 0
    np.testing.assert_array_equal(np.load(seeded), np.load(given))
    with Pipeline.load(bundle, backend="onnxruntime") as pipe:
        python = pipe({"class_labels": [3, 7]}, seed=2**40 + 5).latents
    assert rel(np.load(seeded), python) <= 1e-6


@pytest.mark.parametrize("seed", ["-1", "18446744073709551616", "1e3"])
def test_bad_seed(rstr_run, bundle, tmp_path, seed):
    assert_error(
        run(rstr_run, bundle, "--out", tmp_path / "x.npy", "--class", "3", "--seed", seed),
        f"--seed expects an integer from 0 to 2^64 - 1, got '{seed}'",
    )


def test_installed_package_config(rstr_run, bundle, tmp_path):
    """An application finds the installed library with find_package(rstr_runtime)."""
    src = ROOT / "engines" / "cpp" / "examples" / "consumer"
    configure = subprocess.run(
        ["cmake", "-S", src, "-B", tmp_path, f"-DCMAKE_PREFIX_PATH={INSTALL}"], capture_output=True, text=True
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", tmp_path, "-j", "2"], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    proc = run(tmp_path / "rstr-plan", bundle)
    assert proc.returncode == 0, proc.stderr
    assert "dit bundle, batch 2, sample [2, 1, 8, 8], 4 steps (2 guided)" in proc.stdout


# ----------------------------------------------------------------------------- bad inputs
def edited_copy(bundle: Path, tmp_path: Path, edit) -> Path:
    """A copy of the bundle whose manifest (a dict) is changed by ``edit(manifest, copy_dir)``."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def set_version(m, _):
    m["version"] = 2


def corrupt_step_graph(_, copy):
    data = bytearray((copy / "step_single.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "step_single.onnx").write_bytes(bytes(data))


def entry_outside(m, copy):
    (copy.parent / "outside.bin").write_bytes(b"x")
    m["files"]["../outside.bin"] = {"sha256": "0" * 64, "bytes": 1}


def entry_absolute(m, _):
    m["files"]["/etc/hostname"] = {"sha256": "0" * 64}


def drop_graph_file(_, copy):
    (copy / "step_guided.onnx").unlink()


BAD_BUNDLES = {
    "unknown-version": (set_version, "version is 2; this runtime reads version 1"),
    "failing-checksum": (corrupt_step_graph, "'step_single.onnx' fails its checksum"),
    "entry-outside": (entry_outside, "'../outside.bin' has a '..' component"),
    "entry-absolute": (entry_absolute, "'/etc/hostname' is an absolute path"),
    "missing-file": (drop_graph_file, "'step_guided.onnx' listed in manifest.json is missing"),
}


def assert_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rstr-run: error: "), proc.stderr
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_is_refused(rstr_run, bundle, noise, tmp_path, case):
    edit, message = BAD_BUNDLES[case]
    copy = edited_copy(bundle, tmp_path, edit)
    assert_error(run(rstr_run, copy, "--out", tmp_path / "x.npy", "--class", "3", "--noise", noise), message)
    assert not (tmp_path / "x.npy").exists()


# --------------------------------------------------------------------- the shared schema
SCHEMA = ROOT / "engines" / "schemas" / "bundle.schema.json"


def _set(path, value):
    """An edit that sets manifest[path...] = value."""

    def edit(m, _):
        *parents, last = path
        for key in parents:
            m = m[key]
        m[last] = value

    return edit


def _drop_init_noise_sigma(m, _):
    del m["plan"]["init_noise_sigma"]


# Manifests that break bundle.schema.json, and the words both readers use for what is wrong.
SCHEMA_VIOLATIONS = {
    "step-guided-not-bool": (_set(("plan", "steps", 1, "guided"), "yes"), "plan.steps[1].guided must be a boolean (got string)"),
    "missing-field": (_drop_init_noise_sigma, "plan: missing field(s) init_noise_sigma"),
    "unknown-field": (
        _set(("colour",), "blue"),
        "unknown field(s) colour; allowed: batch, classes, conditioning, decoder, dtype",
    ),
    "batch-zero": (_set(("batch",), 0), "batch is 0; it must be at least 1"),
    "unknown-dtype": (_set(("dtype",), "fp8"), 'dtype is "fp8"; expected one of "fp32", "fp16", "bf16"'),
    "bad-unconditional": (
        _set(("conditioning", "unconditional", "class_labels"), "maybe"),
        'conditioning.unconditional.class_labels is "maybe"; it must match ^required$',
    ),
    "bad-sha256": (_set(("files", "denoiser.onnx", "sha256"), "xyz"), 'files["denoiser.onnx"].sha256 is "xyz"; it must match'),
    "short-range": (_set(("decoder", "range"), [1.0]), "decoder.range has 1 item(s); it must have at least 2"),
}


def _schema_keywords(s: dict) -> set[str]:
    """Every keyword a schema (and its subschemas) uses."""
    out = set(s)
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            out |= _schema_keywords(s[key])
    for group in ("properties", "$defs"):
        for sub in s.get(group, {}).values():
            out |= _schema_keywords(sub)
    return out


@pytest.mark.parametrize("name", ["bundle", "schedule"])
def test_schemas_stay_inside_the_subset_the_cpp_validator_implements(name):
    from rstr.engines import schema

    assert _schema_keywords(schema.load(name)) <= schema.KEYWORDS | schema.ANNOTATIONS


def test_cpp_build_embeds_the_schema_file(rstr_run):
    header = (BUILD / "generated" / "rstr" / "bundle_schema.hpp").read_text()
    assert SCHEMA.read_text() in header


@pytest.mark.parametrize("case", sorted(SCHEMA_VIOLATIONS))
def test_schema_violation_is_refused_by_python_in_one_line(bundle, tmp_path, case):
    from rstr.engines.bundle import Bundle

    from rstr.errors import BundleError

    edit, message = SCHEMA_VIOLATIONS[case]
    with pytest.raises(BundleError) as err:
        Bundle.open(edited_copy(bundle, tmp_path, edit))
    assert "\n" not in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.parametrize("case", sorted(SCHEMA_VIOLATIONS))
def test_schema_violation_is_refused_by_cpp_in_the_same_words(rstr_run, bundle, noise, tmp_path, case):
    from rstr.engines.bundle import Bundle

    from rstr.errors import BundleError

    edit, message = SCHEMA_VIOLATIONS[case]
    copy = edited_copy(bundle, tmp_path, edit)
    proc = run(rstr_run, copy, "--out", tmp_path / "x.npy", "--class", "3", "--noise", noise)
    assert_error(proc, message)
    with pytest.raises(BundleError) as err:
        Bundle.open(copy)
    words = lambda text: text.strip().split("manifest.json: ", 1)[1]  # noqa: E731
    assert words(proc.stderr) == words(str(err.value))


def test_missing_bundle_directory(rstr_run, tmp_path):
    assert_error(run(rstr_run, tmp_path / "nope", "--out", tmp_path / "x.npy", "--class", "3", "--seed", 0), "does not exist")


def test_noise_of_the_wrong_shape(rstr_run, bundle, tmp_path):
    bad = tmp_path / "noise.npy"
    np.save(bad, np.zeros((1, 1, 8, 8), np.float32))
    assert_error(
        run(rstr_run, bundle, "--out", tmp_path / "x.npy", "--class", "3", "--noise", bad),
        "noise has shape [1, 1, 8, 8] but the bundle expects [2, 1, 8, 8]",
    )


def test_noise_of_the_wrong_dtype(rstr_run, bundle, tmp_path):
    bad = tmp_path / "noise.npy"
    np.save(bad, np.zeros((BATCH, 1, 8, 8), np.float64))
    assert_error(
        run(rstr_run, bundle, "--out", tmp_path / "x.npy", "--class", "3", "--noise", bad), "dtype '<f8' is not supported"
    )


@pytest.mark.parametrize("label", ["10", "-1"])
def test_class_label_out_of_range(rstr_run, bundle, noise, tmp_path, label):
    assert_error(
        run(rstr_run, bundle, "--out", tmp_path / "x.npy", "--class", label, "--noise", noise),
        f"class label {label}, out of range: this bundle has classes 0..9",
    )


@pytest.mark.parametrize(
    "backend, option, message",
    [("cuda", "RSTR_WITH_CUDA", "no ONNX Runtime CUDA support"), ("tensorrt", "RSTR_WITH_TENSORRT", "no TensorRT backend")],
)
def test_backend_not_in_this_build(rstr_run, bundle, noise, tmp_path, backend, option, message):
    if f"{option}:BOOL=ON" in (BUILD / "CMakeCache.txt").read_text():
        pytest.skip(f"this build has {option}=ON")
    assert_error(
        run(rstr_run, bundle, "--out", tmp_path / "x.npy", "--class", "3", "--noise", noise, "--backend", backend), message
    )


def test_png_needs_a_decoder(rstr_run, bundle, noise, tmp_path):
    copy = edited_copy(bundle, tmp_path, lambda m, _: m.update(decoder=None))
    assert_error(
        run(rstr_run, copy, "--out", tmp_path / "x.npy", "--png", tmp_path / "x.png", "--class", "3", "--noise", noise),
        'needs a bundle with a decoder ("pixels" or "vae")',
    )
    assert not (tmp_path / "x.npy").exists()


# ------------------------------------------------------------------------- a VAE decoder
@pytest.fixture(scope="module")
def vae_bundle(tmp_path_factory) -> Path:
    """A tiny latent DiT with a tiny AutoencoderKL: the bundle holds vae_decoder.onnx."""
    from rstr.export.build import BuildOptions, build
    from tiny import save_model, tiny_dit, tiny_vae

    from rstr.schedule import GuidanceSchedule

    tmp = tmp_path_factory.mktemp("vae")
    family = tiny_dit(num_classes=NUM_CLASSES)
    model = save_model(family, tmp / "model", vae=tiny_vae(family))
    GuidanceSchedule(family="dit", sampler="ddim", guided=(True, False), scales=(2.0, None), default_steps=2).save(tmp / "s.json")
    build(BuildOptions(model=model, schedule=tmp / "s.json", out=tmp / "bundle", batch=BATCH, measure=False))
    return tmp / "bundle"


def test_vae_images_match_python(rstr_run, vae_bundle, tmp_path):
    from rstr.engines.pipeline import Pipeline

    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((BATCH, 4, 8, 8), dtype=np.float32))
    png, images = tmp_path / "x.png", tmp_path / "images.npy"
    proc = run(rstr_run, vae_bundle, "--out", png, "--images", images, "--class", "3,7", "--noise", noise)
    assert proc.returncode == 0, proc.stderr
    with Pipeline.load(vae_bundle, backend="onnxruntime-cpu") as pipe:
        want = pipe({"class_labels": np.array([3, 7])}, noise=np.load(noise)).images
    got = np.load(images)
    assert got.shape == want.shape == (BATCH, 64, 64, 3)
    assert rel(got, want) <= 1e-5
    from PIL import Image

    with Image.open(png) as image:  # 64-pixel images: not upscaled
        assert image.mode == "RGB" and image.size == (BATCH * 64, 64)
        assert np.abs(np.asarray(image)[:, 64:].astype(np.float32) - want[1] * 255).max() <= 1.0


def test_vae_decoder_missing_from_graphs_is_refused(rstr_run, vae_bundle, tmp_path):
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros((BATCH, 4, 8, 8), np.float32))
    copy = edited_copy(vae_bundle, tmp_path, lambda m, _: m["graphs"].pop("vae_decoder"))
    assert_error(run(rstr_run, copy, "--out", tmp_path / "x.png", "--class", "3", "--noise", noise), "not one of the graphs")


def test_packed_pixel_images_match_python(rstr_run, packed_pixel_bundle, tmp_path):
    """2x2-packed pixel latents (digits-qwenimage) are unpacked by the C++ decoder as by Python's."""
    from rstr.engines.pipeline import Pipeline

    noise, images = tmp_path / "noise.npy", tmp_path / "images.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((BATCH, 16, 4), dtype=np.float32))
    cond, uncond = (dict(np.load(packed_pixel_bundle.parent / f"{name}.npz")) for name in ("cond", "uncond"))
    args = []
    for flag, arrays in (("--cond", cond), ("--uncond", uncond)):
        for name, value in arrays.items():
            np.save(tmp_path / f"{flag[2:]}-{name}.npy", value)
            args += [flag, f"{name}={tmp_path / f'{flag[2:]}-{name}.npy'}"]
    proc = run(rstr_run, packed_pixel_bundle, "--out", tmp_path / "x.png", "--images", images, *args, "--noise", noise)
    assert proc.returncode == 0, proc.stderr
    with Pipeline.load(packed_pixel_bundle, backend="onnxruntime-cpu") as pipe:
        want = pipe(cond, uncond=uncond, noise=np.load(noise)).images
    got = np.load(images)
    assert got.shape == want.shape == (BATCH, 8, 8, 1)
    assert rel(got, want) <= 1e-5
