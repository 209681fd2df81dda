"""One seeding scheme: rstr's seeded noise (Philox4x32-10 + Box-Muller) in numpy, PyTorch and the runtimes.

The numpy generator is checked against Random123's published known answers; the PyTorch
sampler (``seed=``, ``rstr sample --seed``), the Python runtime (``Pipeline(seed=)``,
``rstr-export run --seed``) all draw it; tests/test_cpp.py checks that ``rstr-run --seed`` does.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from rstr.engines import Pipeline
from rstr.engines.bundle import Bundle
from rstr.engines.noise import load_noise, philox4x32, standard_normal

from rstr.errors import RstrError
from rstr.families import load_model
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

# Random123's kat_vectors for Philox4x32-10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_matches_random123(counter, key, expected):
    assert tuple(int(x) for x in philox4x32(np.array([counter], np.uint32), key)[0]) == expected


def test_the_normals_are_box_muller_on_the_philox_words():
    """Value 4n + j from block n = Philox(counter (n, 0, 0, 0), key (seed lo, seed hi)), written out by hand."""
    seed = 2**40 + 7
    words = philox4x32(np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.uint32), (7, 2**8))
    u = (words.astype(np.float64) + 0.5) / 2**32
    r, a = np.sqrt(-2 * np.log(u[:, [0, 2]])), 2 * np.pi * u[:, [1, 3]]
    expected = np.stack(
        [r[:, 0] * np.cos(a[:, 0]), r[:, 0] * np.sin(a[:, 0]), r[:, 1] * np.cos(a[:, 1]), r[:, 1] * np.sin(a[:, 1])], 1
    )
    np.testing.assert_array_equal(standard_normal(seed, (7,)), expected.reshape(-1)[:7].astype(np.float32))


def test_noise_is_standard_normal_reproducible_and_prefix_stable():
    z = standard_normal(0, (200_000,))
    assert z.dtype == np.float32 and abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((np.abs(z) < 1).mean() - 0.6827) < 0.005  # the normal's one-sigma mass
    np.testing.assert_array_equal(standard_normal(0, (200_000,)), z)
    assert not np.array_equal(standard_normal(1, (8,)), z[:8])
    # The stream does not depend on the shape: image 0 of a batch of 2 is the batch-of-1 noise.
    one, two = standard_normal(5, (1, 1, 8, 8)), standard_normal(5, (2, 1, 8, 8))
    np.testing.assert_array_equal(two[:1], one)
    assert standard_normal(2**64 - 1, (3,)).shape == (3,)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_bad_seed_is_refused(seed):
    with pytest.raises(RstrError, match="must be an integer from 0 to 2\\^64 - 1"):
        standard_normal(seed, (2,))


def test_load_noise_checks_dtype_and_shape(tmp_path):
    path = tmp_path / "n.npy"
    np.save(path, np.zeros((2, 3), np.float64))
    with pytest.raises(RstrError, match="float64 is not float32"):
        load_noise(path, (2, 3))
    np.save(path, np.zeros((2, 3), np.float32))
    with pytest.raises(RstrError, match=r"shape \[2, 3\] is not the sample shape \[1, 3\]"):
        load_noise(path, (1, 3))
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(RstrError, match="not a readable .npy file"):
        load_noise(tmp_path / "bad.npy", (1, 3))


# ------------------------------------------------------------ PyTorch and the Python runtime
@pytest.fixture(scope="module")
def model_and_schedule(pixel_dit_bundle):
    """The shared tiny pixel DiT bundle's model (loaded in PyTorch) and schedule."""
    bundle = Bundle.open(pixel_dit_bundle)
    return load_model(bundle.manifest.provenance.model), GuidanceSchedule.load(pixel_dit_bundle / "schedule.json")


def test_sampler_seed_draws_the_seeded_noise(model_and_schedule):
    family, schedule = model_and_schedule
    cond = {"class_labels": torch.tensor([3, 7])}
    first: list[torch.Tensor] = []
    seeded = sample(family, schedule, cond, seed=11, callback=lambda s: first.append(s.sample) if s.index == 0 else None)
    np.testing.assert_array_equal(first[0].numpy(), standard_normal(11, (2, 1, 8, 8)))  # x_T (init_noise_sigma 1)
    given = sample(family, schedule, cond, noise=torch.from_numpy(standard_normal(11, (2, 1, 8, 8))))
    assert torch.equal(seeded, given)
    with pytest.raises(RstrError, match="at most one of noise=, seed= and generator="):
        sample(family, schedule, cond, seed=1, generator=torch.Generator())


def test_pytorch_and_python_runtime_agree_from_one_seed(model_and_schedule, pixel_dit_bundle):
    """Same seed: Pipeline(seed=) draws exactly standard_normal(seed), and its latents match the PyTorch sampler's."""
    family, schedule = model_and_schedule
    with Pipeline.load(pixel_dit_bundle, backend="onnxruntime") as pipe:
        np.testing.assert_array_equal(pipe.noise(11), standard_normal(11, (2, 1, 8, 8)))
        runtime = pipe({"class_labels": [3, 7]}, seed=11).latents
        assert np.array_equal(pipe({"class_labels": [3, 7]}, noise=standard_normal(11, (2, 1, 8, 8))).latents, runtime)
    torch_latents = sample(family, schedule, {"class_labels": torch.tensor([3, 7])}, seed=11).numpy()
    assert np.abs(runtime - torch_latents).max() <= 1e-4 * np.abs(torch_latents).max()


def test_cli_sample_and_export_run_agree_from_one_seed(pixel_dit_bundle, tmp_path, monkeypatch, capsys):
    """`rstr sample --seed` (PyTorch) and `rstr-export run --seed` (ONNX Runtime) from one seed; `--noise` equals `--seed`."""
    from rstr.export.cli import main as export_main

    from rstr.cli import main as rstr_main

    def cli(main, *args) -> str:
        monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        captured = capsys.readouterr()
        assert info.value.code == 0, captured.err
        return captured.out

    model = Bundle.open(pixel_dit_bundle).manifest.provenance.model
    schedule = pixel_dit_bundle / "schedule.json"
    np.save(tmp_path / "noise.npy", standard_normal(4, (2, 1, 8, 8)))
    common = ["--model", model, "--schedule", schedule, "--classes", "3,7"]
    cli(rstr_main, "sample", *common, "--seed", 4, "--out", tmp_path / "seed.npy")
    cli(rstr_main, "sample", *common, "--noise", tmp_path / "noise.npy", "--out", tmp_path / "noise-file.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "seed.npy"), np.load(tmp_path / "noise-file.npy"))
    out = cli(
        export_main,
        "run",
        pixel_dit_bundle,
        "--class",
        "3,7",
        "--seed",
        4,
        "--backend",
        "onnxruntime",
        "--out",
        tmp_path / "run.npy",
        "--json",
    )
    assert json.loads(out) == {"out": str(tmp_path / "run.npy"), "backend": "onnxruntime-cpu", "shape": [2, 1, 8, 8], "seed": 4}
    torch_latents, runtime = np.load(tmp_path / "seed.npy"), np.load(tmp_path / "run.npy")
    assert np.abs(runtime - torch_latents).max() <= 1e-4 * np.abs(torch_latents).max()
