"""Metrics: the Frechet distance, the shipped digits classifier, and the real-model error paths."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from rstr.errors import RstrError
from rstr.families import REFERENCE_MODEL
from rstr.metrics import (
    DigitsClassifier,
    FeatureExtractor,
    GaussianStats,
    InceptionExtractor,
    class_accuracy,
    clip_score,
    frechet_distance,
    frechet_from_stats,
    load_classifier,
    real_digits,
    reference_stats,
    save_classifier,
)

CLASSIFIER = REFERENCE_MODEL / "classifier.safetensors"


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """The textbook formula (pytorch-fid style), as an independent check."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ----------------------------------------------------------------------- Frechet distance
def test_fd_of_identical_sets_is_zero():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_shifted_set_is_the_squared_shift():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    shift = torch.zeros(16)
    shift[3] = 2.0
    assert frechet_distance(x, x + shift) == pytest.approx(4.0, rel=1e-6)
    assert frechet_distance(x, x + 0.1) > 0


def test_fd_matches_the_closed_form_for_gaussians():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2, exactly.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    exact = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    a, b = GaussianStats(mu1, np.diag(v1), 100), GaussianStats(mu2, np.diag(v2), 100)
    assert frechet_from_stats(a, b) == pytest.approx(exact, rel=1e-12)
    # Full covariances: agrees with the scipy.linalg.sqrtm formula.
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    ours = frechet_from_stats(GaussianStats(mu1, s1, 2), GaussianStats(mu2, s2, 2))
    assert ours == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-8)
    # Samples from two Gaussians: the estimate converges to the closed form.
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(40_000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    xb = torch.randn(40_000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    xb = xb + torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    closed = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(xa, xb) == pytest.approx(closed, rel=0.03)


def test_fd_is_real_and_nonnegative_for_rank_deficient_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 64, generator=g)  # fewer samples than dimensions: singular covariance
    y = torch.randn(30, 64, generator=g)
    fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0
    x[:, 5] = 0.0  # a dead feature
    assert np.isfinite(frechet_distance(x, y))


def test_fd_rejects_bad_features():
    with pytest.raises(RstrError, match="2-D"):
        frechet_distance(torch.zeros(10), torch.zeros(10))
    with pytest.raises(RstrError, match="NaN"):
        frechet_distance(torch.full((5, 2), float("nan")), torch.zeros(5, 2))
    with pytest.raises(RstrError, match="different dimensions"):
        frechet_distance(torch.randn(5, 2), torch.randn(5, 3))


# --------------------------------------------------------------------- digits classifier
def test_real_digits_splits():
    xa, ya = real_digits("all")
    xtr, ytr = real_digits("train")
    xte, yte = real_digits("test")
    assert xa.shape == (1797, 1, 8, 8) and xa.min() == -1 and xa.max() == 1
    assert len(ytr) + len(yte) == 1797
    assert set(yte.tolist()) == set(range(10))
    with pytest.raises(RstrError, match="split"):
        real_digits("validation")


def test_shipped_classifier_is_accurate_on_real_test_digits():
    clf = load_classifier(CLASSIFIER)
    assert isinstance(clf, FeatureExtractor)
    xt, yt = real_digits("test")
    assert class_accuracy(xt, yt, clf) >= 0.95
    assert clf.features(xt[:7]).shape == (7, 64)


def test_real_held_out_digits_are_close_to_the_reference_statistics():
    clf = load_classifier(CLASSIFIER)
    ref = reference_stats(clf)
    assert reference_stats(clf) is ref  # computed once
    xt, _ = real_digits("test")
    real_fd = frechet_distance(clf.features(xt), ref)
    noisy = (xt + 0.5 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    noisy_fd = frechet_distance(clf.features(noisy), ref)
    assert real_fd < 3.0
    assert noisy_fd > 10 * real_fd


def test_classifier_file_errors(tmp_path):
    with pytest.raises(RstrError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(RstrError, match="corrupt.safetensors"):
        load_classifier(corrupt)
    # Another model's weights: the DiT transformer of the reference model.
    foreign = REFERENCE_MODEL / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(RstrError, match="diffusion_pytorch_model.safetensors"):
        load_classifier(foreign)


def test_classifier_with_other_shapes_is_refused(tmp_path):
    from safetensors.torch import save_file

    clf = DigitsClassifier()
    path = tmp_path / "wide.safetensors"
    save_classifier(clf, path)
    assert isinstance(load_classifier(path), DigitsClassifier)  # round trip
    state = {k: v.clone() for k, v in clf.state_dict().items()}
    state["head.1.weight"] = torch.zeros(12, 64)  # a 12-class head
    save_file(state, str(path), metadata={"format": "rstr.digits-classifier/1"})
    with pytest.raises(RstrError, match="wide.safetensors"):
        load_classifier(path)


def test_class_accuracy_checks_lengths():
    clf = load_classifier(CLASSIFIER)
    with pytest.raises(RstrError, match="labels"):
        class_accuracy(torch.zeros(3, 1, 8, 8), [0, 1], clf)
    with pytest.raises(RstrError, match=r"\[N, 1, 8, 8\]"):
        clf.features(torch.zeros(3, 3, 32, 32))


# ---------------------------------------------------------------------- real-model metrics
def test_inception_without_weights_names_the_path(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(RstrError, match=str(missing)):
        InceptionExtractor(missing)


def test_inception_with_bad_weights_or_missing_package(tmp_path):
    bad = tmp_path / "pt_inception.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(RstrError, match=r"torchmetrics\[image\]|pt_inception.pth"):
        InceptionExtractor(bad)


def test_clip_score_without_a_model_directory(tmp_path):
    with pytest.raises(RstrError, match="config.json"):
        clip_score(torch.zeros(1, 3, 8, 8), ["a digit"], tmp_path / "clip")
    with pytest.raises(RstrError, match="prompts"):
        clip_score(torch.zeros(2, 3, 8, 8), ["a digit"], tmp_path / "clip")


def test_clip_score_runs_on_a_tiny_local_clip(tmp_path):
    """The whole clip_score path on a random 1-layer CLIP saved locally (no hub access)."""
    pytest.importorskip("transformers")
    from tiny import tiny_clip

    tiny_clip(tmp_path)
    imgs = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    score = clip_score(imgs, ["a digit", "seven"], tmp_path)
    assert 0.0 <= score <= 100.0
    assert clip_score(imgs, ["a digit", "seven"], tmp_path) == score
