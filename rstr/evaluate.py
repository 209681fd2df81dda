"""Evaluate a guidance schedule on a model with classes, by its digits metrics (the reference models).

Noise is drawn from explicit seeds, one ``torch.Generator`` per image seeded with the image's
seed, so two evaluations over the same seeds start every image from identical noise and
schedules are compared *paired*.  Seeds live in half-open ranges (:class:`SeedRange`): the
search, calibration and held-out pools (:mod:`rstr.seeds`) never overlap, and a search is reported on
held-out seeds it never saw.

Evaluation ``g`` of ``groups`` uses seeds ``[seed_start + g*num, seed_start + (g+1)*num)``,
image ``i`` of a group gets class label ``i % num_classes``; each group is scored on its own
(Frechet distance against the real digits' statistics, and class accuracy), so the spread
over groups is reported next to the mean.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.metrics import DigitsClassifier, FeatureExtractor, GaussianStats, frechet_distance, load_classifier, reference_stats
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule
from rstr.seeds import SeedRange, eval_seeds


def noise_for_seeds(family: Family, seeds: range | SeedRange) -> torch.Tensor:
    """One noise tensor per seed, each from its own CPU generator: independent of batching and device."""
    return torch.cat([family.noise(1, torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def eval_batch(device: torch.device | str) -> int:
    """Images per sampler call: 50 on a CPU, 500 on a GPU.

    On a CPU, batches of a few hundred images make activations of tens of MB, which glibc's malloc
    maps and unmaps on every call: the page faults cost up to a quarter of the throughput
    (docs/benchmarks-eval-batch.md).  Results do not depend on it: every image has its own noise.
    """
    return 500 if torch.device(device).type == "cuda" else 50


# Another way to turn (cond, uncond or None, noise) into final latents, e.g. a bundle on its runtime.
Generate = Callable[[dict[str, torch.Tensor], "dict[str, torch.Tensor] | None", torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    """Scores of one schedule over ``groups`` seed groups of ``num`` images."""

    schedule: str
    num: int
    groups: int
    seeds: tuple[int, int]
    fd: list[float]
    accuracy_per_group: list[float]
    passes_per_image: int
    compute_fraction: float
    seconds: float
    images: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def fd_mean(self) -> float:
        return sum(self.fd) / len(self.fd)

    @property
    def fd_std(self) -> float:
        return _std(self.fd)

    @property
    def accuracy(self) -> float:
        return sum(self.accuracy_per_group) / len(self.accuracy_per_group)

    @property
    def accuracy_std(self) -> float:
        return _std(self.accuracy_per_group)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("images", "labels")}
        d.update(fd_mean=self.fd_mean, fd_std=self.fd_std, accuracy=self.accuracy, accuracy_std=self.accuracy_std)
        return d

    def summary(self) -> str:
        return (
            f"FD {self.fd_mean:.3f} ± {self.fd_std:.3f}, accuracy {self.accuracy:.3f} ± {self.accuracy_std:.3f}, "
            f"{self.passes_per_image} passes/image ({self.compute_fraction:.0%}), {self.seconds:.1f} s"
        )


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def evaluate(
    family: Family,
    schedule: GuidanceSchedule,
    *,
    num: int,
    groups: int,
    seed_start: int,
    batch_size: int | None = None,
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
    reference: GaussianStats | None = None,
    classifier: DigitsClassifier | None = None,
    keep_images: bool = False,
    generate: Generate | None = None,
) -> EvalResult:
    """Sample ``groups`` x ``num`` images under ``schedule`` and score each group.

    Defaults score a model whose quality measure is the digits metrics (``family.quality``):
    features and accuracy from the classifier it ships, Frechet distance against the real
    digits.  Another model with classes goes through the same code path with ``extractor``
    (e.g. :class:`rstr.metrics.InceptionExtractor`) and ``reference`` statistics of its real
    data; accuracy is then reported only if ``classifier`` is given.  A Stage-2 adapter is
    scored the way it is deployed: merged into the family first (:func:`rstr.calibrate.apply_adapter`).
    ``generate(cond, uncond, noise)`` replaces the PyTorch sampler, e.g. to score a bundle on its
    runtime (:func:`rstr.compare.score_bundle`); it must run ``schedule``.
    """
    batch_size = eval_batch(family.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise RstrError(f"batch_size {batch_size} must be at least 1")
    if family.num_classes is None:
        raise RstrError(f"evaluate() draws images per class; this {family.name} model has no classes (no class table)")
    seeds = eval_seeds(seed_start, num, groups)
    if extractor is None:
        if family.quality != "digits":
            raise RstrError(
                f"this {family.name} model ships no digits classifier and image layout (rstr.json); "
                "pass extractor= and reference= to score it"
            )
        classifier = classifier if classifier is not None else load_classifier(family.classifier_path)
        extractor = classifier
        reference = reference if reference is not None else reference_stats(classifier)
    elif reference is None:
        raise RstrError("evaluate(extractor=...) needs reference= statistics of the real data (GaussianStats.of(features))")

    lo_px, hi_px = family.image.range if family.image is not None else (-1.0, 1.0)
    labels_group = torch.arange(num) % family.num_classes
    fds: list[float] = []
    accs: list[float] = []
    kept_images, kept_labels = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for g in range(groups):
            g_seeds = range(seed_start + g * num, seed_start + (g + 1) * num)
            noise = noise_for_seeds(family, g_seeds)
            outs = []
            for lo in range(0, num, batch_size):
                hi = min(num, lo + batch_size)
                cond, uncond = family.conditioning_for(labels_group[lo:hi])
                if generate is None:
                    latents = sample(family, schedule, cond, uncond=uncond, noise=noise[lo:hi], progress=progress)
                else:
                    latents = generate(cond, uncond, noise[lo:hi])
                outs.append(family.to_images(latents).float().cpu())
            images = torch.cat(outs).clamp(lo_px, hi_px)
            fds.append(frechet_distance(extractor.features(images), reference))
            if classifier is not None:
                accs.append(float((classifier.logits(images).argmax(1) == labels_group).float().mean()))
            if keep_images:
                kept_images.append(images)
                kept_labels.append(labels_group.clone())
    seconds = time.perf_counter() - t0
    return EvalResult(
        schedule=schedule.describe(),
        num=num,
        groups=groups,
        seeds=(seeds.start, seeds.stop),
        fd=fds,
        accuracy_per_group=accs or [float("nan")] * groups,
        passes_per_image=schedule.passes_per_image,
        compute_fraction=schedule.compute_fraction,
        seconds=seconds,
        images=torch.cat(kept_images) if keep_images else None,
        labels=torch.cat(kept_labels) if keep_images else None,
    )


# ----------------------------------------------------------------------------- pictures
def sample_grid(
    images: torch.Tensor, labels: torch.Tensor | list[int], path: str | os.PathLike[str], per_class: int = 10
) -> Path:
    """Write a PNG grid, one row per class (up to ``per_class`` images each), images in ``[-1, 1]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rstr._io import atomic_path

    labels = torch.as_tensor(labels).reshape(-1)
    if images.ndim != 4 or len(images) != len(labels):
        raise RstrError(f"sample_grid needs images [N, C, H, W] and N labels; got {tuple(images.shape)} and {len(labels)} labels")
    classes = sorted({int(c) for c in labels})
    width = per_class * 0.6 + 0.4  # inches; 0.4 on the left for the class labels
    fig, axes = plt.subplots(len(classes), per_class, figsize=(width, len(classes) * 0.6), squeeze=False)
    for r, c in enumerate(classes):
        rows = images[labels == c][:per_class]
        for j in range(per_class):
            ax = axes[r][j]
            ax.set_axis_off()
            if j < len(rows):
                img = ((rows[j].float().clamp(-1, 1) + 1) / 2).cpu()
                pixels = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()
                ax.imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r][0].text(-0.15, 0.5, str(c), transform=axes[r][0].transAxes, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.4 / width, right=1, top=1, bottom=0, wspace=0.05, hspace=0.05)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
