"""Sample-quality metrics: one feature-extractor code path for the digits model and real models.

Every metric here looks at images as ``Tensor[N, C, H, W]`` in ``[-1, 1]`` and goes through a
:class:`FeatureExtractor`:

* :class:`DigitsClassifier` -- a tiny CNN trained on scikit-learn's real 8x8 digits, shipped
  with the reference model (``classifier.safetensors``).  Its penultimate 64-d activations are
  the features of the digits Frechet distance, and its logits give :func:`class_accuracy`.
* :class:`InceptionExtractor` -- InceptionV3 pool features for real models: torchmetrics' FID
  network (``NoTrainInceptionV3``) from a LOCAL weights file (nothing is ever downloaded).
* :func:`clip_score` -- torchmetrics' ``CLIPScore`` with a CLIP model from a local directory.

:func:`frechet_distance` is the usual Frechet distance between Gaussians fitted to two feature
sets, computed through symmetric eigendecompositions so that it is real and stable even for
rank-deficient covariances; tests/test_metrics_parity.py checks it against torchmetrics'
``FrechetInceptionDistance`` on the same features.  torchmetrics and transformers (the
``metrics`` extra) are imported only by the real-model metrics.
"""

from __future__ import annotations

import functools
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch import nn

from rstr.errors import RstrError

CLASSIFIER_FORMAT = "rstr.digits-classifier/1"
NUM_CLASSES = 10
FEATURE_DIM = 64
TEST_FRACTION = 0.25  # the classifier's held-out split of load_digits (stratified, fixed seed)
SPLIT_SEED = 0


# ------------------------------------------------------------------------------ protocol
@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps images in ``[-1, 1]`` to one feature vector per image."""

    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[N, C, H, W]`` in ``[-1, 1]``; returns float ``[N, D]``."""
        ...


# ----------------------------------------------------------------------------- real data
@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, torch.tensor(data.target, dtype=torch.int64)


def real_digits(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits as ``([N, 1, 8, 8] in [-1, 1], labels)``.

    ``split`` is ``"all"`` (1,797 images: what the diffusion model was trained on and what the
    reference statistics describe), or the classifier's ``"train"`` / ``"test"`` split
    (stratified, ``TEST_FRACTION`` held out, fixed seed).
    """
    images, labels = _digits()
    if split == "all":
        return images.clone(), labels.clone()
    if split not in ("train", "test"):
        raise RstrError(f"digits split {split!r} is unknown; use 'all', 'train' or 'test'")
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels.numpy()
    )
    idx = torch.as_tensor(np.sort(idx_train if split == "train" else idx_test))
    return images[idx].clone(), labels[idx].clone()


# ----------------------------------------------------------------------- the classifier
class DigitsClassifier(nn.Module):
    """A tiny CNN for 8x8 digits: two 3x3 convolutions, a 2x2 pool, a 64-d hidden layer.

    ``features`` (the 64-d hidden layer, before its ReLU: no dead dimensions, closer to
    Gaussian) feeds the Frechet distance; ``forward`` gives
    logits for :func:`class_accuracy`.  Inputs are clamped to ``[-1, 1]`` first, since samples
    from a diffusion model may overshoot slightly.
    """

    name = "digits-cnn"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise RstrError(f"the digits classifier takes images [N, 1, 8, 8], got {tuple(images.shape)}")
        p = next(self.parameters())
        return images.to(p.device, p.dtype).clamp(-1.0, 1.0)

    def hidden_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(self._check(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_features(images))

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.hidden_features(b) for b in images.split(1024)]).float().cpu()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self(b) for b in images.split(1024)]).float().cpu()


def train_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3) -> tuple[DigitsClassifier, float]:
    """Train :class:`DigitsClassifier` on the train split, deterministically; return it and its test accuracy.

    Recipe: AdamW (weight decay 1e-4), cosine learning-rate decay, batches of 64; the train
    images get a random shift of up to one pixel (zero padded) and light Gaussian noise
    (sigma 0.05), so that the features are not keyed to the exact pixel grid or the 17 grey
    levels of the real data -- diffusion samples are continuous-valued.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    x, y = real_digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for idx in perm.split(batch_size):
            xb = _augment(x[idx], gen)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = real_digits("test")
    acc = float((model.logits(xt).argmax(1) == yt).float().mean())
    return model, acc


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (zero = background is -1) and add light noise."""
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    shifts = torch.randint(0, 3, (len(x), 2), generator=gen)
    out = torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(shifts.tolist())])
    return (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp(-1.0, 1.0)


def save_classifier(model: DigitsClassifier, path: str | os.PathLike[str], info: dict | None = None) -> None:
    """Write the weights as safetensors, tagged with :data:`CLASSIFIER_FORMAT` (and ``info``)."""
    from safetensors.torch import save_file

    from rstr._io import atomic_path

    meta = {"format": CLASSIFIER_FORMAT, "info": json.dumps(info or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_classifier(path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load a saved classifier (default: the one shipped with the reference model).

    Missing, corrupt or foreign files (another model's weights, another format) raise
    :class:`RstrError` naming the file.
    """
    path = Path(path) if path is not None else default_classifier_path()
    return _load_classifier_cached(str(path.resolve()), _mtime(path), str(device))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


@functools.lru_cache(maxsize=8)
def _load_classifier_cached(path_str: str, mtime: float, device: str) -> DigitsClassifier:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path_str)
    fix = "retrain it with `python tools/train_reference.py --classifier-only`"
    if not path.is_file():
        raise RstrError(f"digits classifier {path} does not exist; {fix}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RstrError(
            f"digits classifier {path} is not a readable safetensors file ({str(err).splitlines()[0]}); {fix}"
        ) from None
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise RstrError(
            f"{path} is not an rstr digits classifier (format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}); {fix}"
        )
    model = DigitsClassifier()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise RstrError(f"{path} does not match the digits classifier (first mismatch: {diff[0]}); {fix}")
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def default_classifier_path() -> Path:
    """``classifier.safetensors`` of the reference model, as named in its ``rstr.json``."""
    from rstr.families import REFERENCE_MODEL

    meta_path = REFERENCE_MODEL / "rstr.json"
    name = "classifier.safetensors"
    if meta_path.is_file():
        try:
            name = json.loads(meta_path.read_text()).get("classifier", name)
        except (OSError, json.JSONDecodeError):
            pass
    return REFERENCE_MODEL / name


# ------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (float64), the input of the Frechet distance."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, feats: torch.Tensor | np.ndarray) -> GaussianStats:
        x = _as_features(feats)
        if len(x) < 2:
            raise RstrError(f"the Frechet distance needs at least 2 feature vectors per set, got {len(x)}")
        return cls(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), len(x))


def _as_features(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise RstrError(f"features must be a 2-D array [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise RstrError("features contain NaN or infinite values; check the images fed to the extractor")
    return x


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    ``Tr((S_a S_b)^(1/2)) = Tr((R S_b R)^(1/2))`` with ``R = S_a^(1/2)``; both square roots are
    of symmetric PSD matrices, so eigendecompositions give a real, stable answer without the
    complex round-off and singular-matrix offsets ``scipy.linalg.sqrtm`` needs.
    """
    if a.mu.shape != b.mu.shape:
        raise RstrError(f"feature sets have different dimensions: {a.mu.shape[0]} and {b.mu.shape[0]}")
    r = _psd_sqrt(a.sigma)
    w = np.linalg.eigvalsh((r @ b.sigma @ r + (r @ b.sigma @ r).T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = a.mu - b.mu
    fd = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance(
    feats_a: torch.Tensor | np.ndarray | GaussianStats, feats_b: torch.Tensor | np.ndarray | GaussianStats
) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (or their stats)."""
    a = feats_a if isinstance(feats_a, GaussianStats) else GaussianStats.of(feats_a)
    b = feats_b if isinstance(feats_b, GaussianStats) else GaussianStats.of(feats_b)
    return frechet_from_stats(a, b)


_REFERENCE_CACHE: weakref.WeakKeyDictionary[object, dict[str, GaussianStats]] = weakref.WeakKeyDictionary()


def reference_stats(extractor: FeatureExtractor | None = None, split: str = "all") -> GaussianStats:
    """Feature statistics of the real digits (``split``), computed once per extractor and cached."""
    extractor = extractor if extractor is not None else load_classifier()
    per_split = _REFERENCE_CACHE.setdefault(extractor, {})
    if split not in per_split:
        images, _ = real_digits(split)
        per_split[split] = GaussianStats.of(extractor.features(images))
    return per_split[split]


def class_accuracy(images: torch.Tensor, labels: torch.Tensor | list[int], classifier: DigitsClassifier | None = None) -> float:
    """Fraction of ``images`` the digits classifier assigns to their intended ``labels``."""
    classifier = classifier if classifier is not None else load_classifier()
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(labels) != len(images):
        raise RstrError(f"{len(images)} images but {len(labels)} labels; give one label per image")
    return float((classifier.logits(images).argmax(1) == labels).float().mean())


# ---------------------------------------------------------------------- real-model metrics
def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise RstrError(f"images must be [N, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionExtractor:
    """InceptionV3 pool features (the FID network of torchmetrics and torch-fidelity) from a LOCAL weights file.

    ``weights`` is the FID Inception state dict (``weights-inception-2015-12-05-6726825d.pth``);
    it is never downloaded.  The network is torchmetrics' ``NoTrainInceptionV3``, so the features
    are those of torchmetrics' ``FrechetInceptionDistance``.  Needs ``pip install 'rstr[metrics]'``.
    """

    name = "inception-v3"

    def __init__(self, weights: str | os.PathLike[str], device: str | torch.device = "cpu", feature: str = "2048") -> None:
        path = Path(weights)
        if not path.is_file():
            raise RstrError(
                f"Inception weights {path} do not exist; download the FID Inception weights "
                "(weights-inception-2015-12-05-6726825d.pth) on a machine with internet and pass their local path"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:
            raise RstrError(f"FID needs torchmetrics[image] ({err}); install it with `pip install 'rstr[metrics]'`") from None
        try:
            net = NoTrainInceptionV3("inception-v3-compat", [feature], feature_extractor_weights_path=str(path))
        except ModuleNotFoundError as err:
            raise RstrError(f"FID needs torchmetrics[image] ({err}); install it with `pip install 'rstr[metrics]'`") from None
        except Exception as err:  # noqa: BLE001 -- any load failure is a bad weights file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RstrError(
                f"Inception weights {path} could not be loaded ({first}); give the FID Inception state dict"
            ) from None
        self.net = net.to(device)
        self.device = torch.device(device)

    @torch.inference_mode()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        x = _to_uint8_rgb(images)
        return torch.cat([self.net(b.to(self.device)).reshape(len(b), -1).float().cpu() for b in x.split(batch_size)])


def clip_score(
    images: torch.Tensor, prompts: list[str], clip_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> float:
    """torchmetrics' CLIP score, ``max(100 * mean cos(image, text), 0)``, with a CLIP model from a LOCAL directory.

    ``clip_dir`` holds ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` output;
    nothing is downloaded.
    """
    path = Path(clip_dir)
    if len(prompts) != len(images):
        raise RstrError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    if not (path / "config.json").is_file():
        raise RstrError(
            f"CLIP directory {path} has no config.json; save a CLIP model there with `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained`"
        )
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as err:
        raise RstrError(
            f"CLIP score needs torchmetrics and transformers ({err}); install them with `pip install 'rstr[metrics]'`"
        ) from None
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise RstrError(f"CLIP directory {path} could not be loaded ({str(err).strip().splitlines()[0]})") from None

    def load() -> tuple[CLIPModel, CLIPProcessor]:
        # Duck-typed: CLIPScore uses only the model's config, get_*_features and .to.
        return cast(CLIPModel, _ProjectedCLIP(model)), processor

    metric = CLIPScore(model_name_or_path=load).to(device)
    with torch.inference_mode():
        metric.update(_to_uint8_rgb(images).to(device), list(prompts))
        return float(metric.compute())


class _ProjectedCLIP(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors, as torchmetrics expects.

    transformers 5 returns a model output there (the embeddings in ``.pooler_output``), which
    torchmetrics' ``CLIPScore`` (1.9) cannot normalise.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _pooled(out) -> torch.Tensor:
    """Projected embeddings: a tensor in transformers 4, ``.pooler_output`` of a model output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
