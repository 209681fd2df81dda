"""Train rstr's reference model: a tiny class-conditional DiT on scikit-learn's 8x8 digits.

The reference model is the default model of every rstr command (``rstr.families.load_model()``
with no argument): small enough to train, search and test on two CPU cores, real enough that
classifier-free guidance matters (guidance helps at moderate scales and hurts when overdone).

Recipe (``--seed 0`` reproduces the shipped model on the same machine and torch build)
-------------------------------------------------------------------------------------
* Data: ``sklearn.datasets.load_digits`` -- all 1,797 real 8x8 grayscale digits, 10 classes,
  pixel values 0..16 scaled to ``[-1, 1]``; no augmentation.
* Model: ``diffusers.DiTTransformer2DModel``, 1 channel, ``sample_size`` 8, ``patch_size`` 2
  (16 tokens), 4 blocks, 4 heads x 32 = hidden 128, ``ada_norm_zero``, ``out_channels`` 1 (no
  learned sigma), ``num_embeds_ada_norm`` 10.  diffusers gives each label table an extra row
  (11 rows) because its class-dropout probability is > 0; row 10 = ``num_classes`` is the null
  class, which is what ``DiTFamily.unconditional`` feeds.  diffusers would drop labels itself
  in train mode, but independently in every block (and again for the output layer); we switch
  that off and drop labels once per sample instead, so the null embedding is learned
  consistently: label -> 10 with probability ``--label-dropout`` (0.1).
* Diffusion: epsilon prediction, cosine (``squaredcos_cap_v2``) betas, 1,000 train timesteps,
  timesteps drawn uniformly, MSE loss.
* Optimisation: AdamW (lr ``--lr``, betas (0.9, 0.999), weight decay 0.01), batch 128, linear
  warm-up over 200 steps then cosine decay to 10%, gradient norm clipped at 1, ``--steps``
  steps; an EMA of the weights (decay 0.999, warmed up as ``min(decay, (1+n)/(10+n))``) is what
  gets saved.  ``torch.set_num_threads(2)``, deterministic algorithms, all randomness from
  explicit generators seeded by ``--seed``.
* Sampler: ``DDIMScheduler`` with the same betas, ``clip_sample=False``,
  ``set_alpha_to_one=False``, ``timestep_spacing="leading"`` (25 steps: t = 960, 920, ..., 0).
  "trailing" (and "linspace") start at t = 999, where the cosine schedule's alpha_bar is
  2.4e-9: DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) then divides the model's eps error by
  5e-5 and every sample is ruined (measured: Frechet distance ~500 instead of ~4, accuracy
  0.5, at any step count).  "leading" starts at t = 960 (alpha_bar 3.7e-3) and samples well.
* ``default_scale``: the constant CFG scale with the lowest digits Frechet distance on
  calibration seeds (never the held-out seeds), among ``--scales``.
* Classifier: :class:`rstr.metrics.DigitsClassifier`, trained on the train split of the real
  digits (see :func:`rstr.metrics.train_classifier`); it ships beside the model.

Outputs go to a temporary sibling of ``--out`` and are renamed into place when complete.

Usage::

    python tools/train_reference.py --out rstr/reference/digits-dit --seed 0
    python tools/train_reference.py --out rstr/reference/digits-dit --classifier-only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rstr._io import atomic_dir, write_json
from rstr.errors import RstrError
from rstr.families import REFERENCE_MODEL

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # = num_embeds_ada_norm: the row diffusers adds for class dropout


def make_transformer():
    """The reference DiT architecture, freshly initialised."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )


def make_scheduler(spacing: str):
    """The DDIM sampler shipped with the model (same betas as training)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
        prediction_type="epsilon",
    )


def _disable_internal_label_dropout(model: nn.Module) -> int:
    """Turn off diffusers' per-block label dropout (the table keeps its null row); return the count."""
    from diffusers.models.embeddings import LabelEmbedding

    n = 0
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            if m.embedding_table.num_embeddings != NUM_CLASSES + 1 or m.num_classes != NULL_CLASS:
                raise AssertionError("diffusers' LabelEmbedding no longer has a null row at index num_classes")
            m.dropout_prob = 0.0
            n += 1
    return n


def train_dit(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Train the DiT and return its EMA copy (on the CPU) and a record of the run.

    Every random draw comes from one CPU generator, so ``--device`` changes only the arithmetic.
    """
    from diffusers import DDPMScheduler

    from rstr.metrics import real_digits

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)
    images, labels = real_digits("all")
    images = images.to(dev)
    model = make_transformer().to(dev)
    _disable_internal_label_dropout(model)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    acp = noise_sched.alphas_cumprod.float().to(dev)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    warmup = 200

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    perm, pos = torch.randperm(len(labels), generator=gen), 0
    losses: list = []  # loss tensors, turned into floats every 50 steps (no sync per step on a GPU)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train dit", mininterval=2.0)
    for step in bar:
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(labels), generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = NULL_CLASS
        t = torch.randint(0, 1000, (len(y),), generator=gen)
        eps = torch.randn((len(y), *images.shape[1:]), generator=gen)
        x0, y, t, eps = images[idx.to(dev)], y.to(dev), t.to(dev), eps.to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = model(xt, timestep=t, class_labels=y, return_dict=False)[0]
        loss = nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.detach())
        if step % 50 == 0:
            losses = [float(v) for v in losses]
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    losses = [float(v) for v in losses]
    record = {
        "train_seconds": round(time.time() - t0, 1),
        "final_loss_avg200": round(sum(losses[-200:]) / len(losses[-200:]), 5),
    }
    return ema.cpu(), record


def choose_scale(out: Path, scales: list[float], steps: int, num: int) -> tuple[float, dict]:
    """Pick the constant CFG scale with the lowest Frechet distance on calibration seeds."""
    from rstr.evaluate import evaluate
    from rstr.families import load_model
    from rstr.metrics import load_classifier
    from rstr.schedule import GuidanceSchedule
    from rstr.seeds import CALIBRATION_SEEDS

    family = load_model(out)
    classifier = load_classifier(out / "classifier.safetensors")
    table = {}
    for w in scales:
        s = GuidanceSchedule.constant(w, steps, family="dit", sampler="ddim", default_steps=steps)
        r = evaluate(family, s, num=num, groups=1, seed_start=CALIBRATION_SEEDS.start, classifier=classifier, progress=False)
        table[str(w)] = {"fd": round(r.fd_mean, 4), "accuracy": round(r.accuracy, 4)}
        print(f"  calibration: constant w={w}: FD {r.fd_mean:.3f}  accuracy {r.accuracy:.3f}", flush=True)
    best = min(scales, key=lambda w: table[str(w)]["fd"])
    return best, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REFERENCE_MODEL, help="model directory to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability a label becomes the null class (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default="leading", help="DDIM timestep spacing (default: %(default)s; see the module docstring)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0], help="constant scales tried for default_scale (default: %(default)s)")
    p.add_argument("--calibration-num", type=int, default=1000, help="images per scale when choosing default_scale")
    p.add_argument("--device", default="cpu", help="training device; the shipped model is trained on the CPU (default: %(default)s)")
    p.add_argument("--classifier-only", action="store_true", help="retrain only the classifier of an existing --out")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an rstr model directory")
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=args.device != "cpu")
    try:
        return _run(args)
    except RstrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from rstr.metrics import save_classifier, train_classifier

    out: Path = args.out
    if args.classifier_only:
        meta_path = out / "rstr.json"
        if not meta_path.is_file():
            raise RstrError(f"{out} has no rstr.json; train the whole model first (drop --classifier-only)")
        meta = json.loads(meta_path.read_text())
        clf, acc = train_classifier(seed=args.seed)
        save_classifier(clf, out / meta.get("classifier", "classifier.safetensors"), {"test_accuracy": acc, "seed": args.seed})
        meta.setdefault("recipe", {})["classifier_test_accuracy"] = round(acc, 4)
        write_json(meta_path, meta)
        print(f"classifier test accuracy {acc:.4f} -> {out}")
        return 0
    if out.exists() and not args.force and any(out.iterdir()) and not (out / "rstr.json").is_file():
        raise RstrError(f"{out} exists and is not an rstr model directory; pass --force to replace it")

    t0 = time.time()
    clf, clf_acc = train_classifier(seed=args.seed)
    print(f"classifier: test accuracy {clf_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    ema, record = train_dit(args)

    recipe = {
        "data": "sklearn.datasets.load_digits, all 1797 images, [0,16] -> [-1,1]",
        "prediction": "epsilon",
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "optimizer": "AdamW(betas=(0.9,0.999), weight_decay=0.01), warmup 200, cosine to 10%, clip 1.0",
        "lr": args.lr,
        "label_dropout": args.label_dropout,
        "null_class": NULL_CLASS,
        "ema_decay": args.ema_decay,
        "timestep_spacing": args.spacing,
        "classifier_test_accuracy": round(clf_acc, 4),
        "torch": torch.__version__,
        "device": args.device,
        **record,
    }
    with atomic_dir(out, force=True) as tmp:
        ema.save_pretrained(tmp / "transformer", safe_serialization=True)
        make_scheduler(args.spacing).save_pretrained(tmp / "scheduler")
        save_classifier(clf, tmp / "classifier.safetensors", {"test_accuracy": clf_acc, "seed": args.seed})
        meta = {
            "name": "digits-dit",
            "family": "dit",
            "default_steps": 25,
            "default_scale": None,
            "num_classes": NUM_CLASSES,
            "image": {"channels": 1, "size": 8, "range": [-1, 1]},
            "classifier": "classifier.safetensors",
            "classifier_config": {"class": "rstr.metrics.DigitsClassifier", "features": 64, "test_accuracy": round(clf_acc, 4)},
            "seed": args.seed,
            "recipe": recipe,
        }
        write_json(tmp / "rstr.json", meta)
        best, table = choose_scale(tmp, args.scales, 25, args.calibration_num)
        meta["default_scale"] = best
        meta["recipe"]["scale_calibration"] = {"steps": 25, "num": args.calibration_num, "fd_by_scale": table}
        write_json(tmp / "rstr.json", meta)
        for junk in tmp.rglob("__pycache__"):
            shutil.rmtree(junk, ignore_errors=True)
    print(f"wrote {out}: default_scale {best}, {time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
