"""rstr's metrics against torchmetrics on the same inputs: the Frechet distance and the CLIP score.

rstr keeps its own Frechet distance (symmetric eigendecompositions, stable for rank-deficient
covariances); torchmetrics' ``FrechetInceptionDistance`` fed the same features through a custom
feature module must give the same number.  ``clip_score`` is torchmetrics' ``CLIPScore`` on a
local CLIP directory; it is checked against the cosine the CLIP model itself computes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rstr.metrics import clip_score, frechet_distance, load_classifier, real_digits

pytest.importorskip("torchmetrics")
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402


class Given(nn.Module):
    """A 'feature extractor' whose inputs already are the features: FID on given feature sets."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DigitsFeatures(nn.Module):
    """The digits classifier's Frechet features as a torchmetrics feature module."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.classifier = load_classifier()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def torchmetrics_fd(module: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    fid = FrechetInceptionDistance(feature=module)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


@pytest.mark.parametrize("shift", [0.0, 0.3, 2.0])
def test_fd_equals_torchmetrics_on_the_same_features(shift):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g)  # correlated features
    a = torch.randn(600, 16, generator=g) @ mix
    b = torch.randn(500, 16, generator=g) @ (mix + 0.2 * torch.randn(16, 16, generator=g)) + shift
    ours, theirs = frechet_distance(a, b), torchmetrics_fd(Given(16), a, b)
    assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)


def test_digits_fd_equals_torchmetrics_with_the_classifier_as_its_feature_network():
    """The reference model's FD: real train vs test digits, and vs noised test digits, scored both ways."""
    train, _ = real_digits("train")
    test, _ = real_digits("test")
    noised = (test + 0.3 * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    clf = load_classifier()
    for fake in (test, noised):
        ours = frechet_distance(clf.features(train), clf.features(fake))
        assert ours == pytest.approx(torchmetrics_fd(DigitsFeatures(), train, fake), rel=1e-5)
    assert frechet_distance(clf.features(train), clf.features(noised)) > frechet_distance(clf.features(train), clf.features(test))


def test_clip_score_is_the_clip_models_own_cosine(tmp_path, monkeypatch):
    """torchmetrics' CLIPScore on a local directory, offline: 100 x mean cos(image, text), floored at 0."""
    transformers = pytest.importorskip("transformers")
    from tiny import tiny_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_clip(tmp_path)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a digit", "seven", "zero"]
    model = transformers.CLIPModel.from_pretrained(tmp_path, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path, local_files_only=True)
    pixels = [((im + 1) * 127.5).round().to(torch.uint8) for im in images]
    inputs = processor(text=prompts, images=pixels, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    expected = float(100 * cos.mean())
    assert expected > 0  # the floor at 0 does not hide the comparison
    assert clip_score(images, prompts, tmp_path) == pytest.approx(expected, rel=1e-5, abs=1e-5)
