"""Train rstr's reference models: tiny guided diffusion transformers on scikit-learn's 8x8 digits.

One recipe, four families (``--family``), each a real instance of its diffusers class, so that
the family's own code path is what gets searched, calibrated and exported:

* ``dit`` -> ``digits-dit``: ``DiTTransformer2DModel``, class labels, epsilon, DDIM.  The default
  model of every rstr command (``rstr.families.load_model()`` with no argument).
* ``pixart`` -> ``digits-pixart``: ``PixArtTransformer2DModel``, prompt embeddings + mask,
  epsilon, DDIM.
* ``flux`` -> ``digits-flux``: ``FluxTransformer2DModel``, packed latents, prompt + pooled
  embeddings, flow matching, Euler, true CFG (``FluxPipeline``'s ``true_cfg_scale``).
* ``qwenimage`` -> ``digits-qwenimage``: ``QwenImageTransformer2DModel``, packed latents, prompt
  embeddings + mask, flow matching, Euler, true CFG with Qwen-Image's norm rescale.

Each is small enough to train, search and test on two CPU cores, and real enough that
classifier-free guidance matters (guidance helps at moderate scales and hurts when overdone).
All have hidden size 128 (4 heads x 32) on 16 image tokens (2x2 patches of the 8x8 image):

* DiT: 4 blocks, ``ada_norm_zero``, ``num_embeds_ada_norm`` 10, no learned sigma (1.4 M parameters).
* PixArt-alpha: 4 blocks, ``ada_norm_single``, cross-attention to the prompt, ``caption_channels``
  64, no learned sigma, no resolution conditioning (1.2 M).
* FLUX: 1 double-stream + 2 single-stream blocks, ``joint_attention_dim`` 64,
  ``pooled_projection_dim`` 32, rotary axes (8, 12, 12), no guidance embedding (1.2 M).
* Qwen-Image: 3 double-stream blocks, ``joint_attention_dim`` 64, rotary axes (8, 12, 12) (1.9 M).

The text families' sizes, batch (64), learning rate (2e-3) and steps (3,000) were chosen in a sweep
(GPU, same recipe) for the best calibration Frechet distance per CPU second: FLUX with 2 + 2
blocks scored slightly better at 1.4x the time, Qwen-Image with 2 blocks clearly worse; batch
64 x 3,000 steps scored about as well as batch 128 x 2,000 steps at three quarters of the compute
(at lr 2e-3, best FD within 0.05 for PixArt and FLUX, 0.6 higher for Qwen-Image).

Recipe (``--seed 0`` reproduces a shipped model on the same machine and torch build)
------------------------------------------------------------------------------------
* Data: ``sklearn.datasets.load_digits`` -- all 1,797 real 8x8 grayscale digits, 10 classes,
  pixel values 0..16 scaled to ``[-1, 1]``; no augmentation.  FLUX and Qwen-Image see them
  packed as their pipelines pack latents (2x2 patches -> 16 tokens of 4 channels,
  :func:`rstr.families.flux.pack_latents`).
* Conditioning: row ``k`` of a table is class ``k``; row 10 (``num_classes``) is the
  unconditional input.  DiT's table is its own label embedding: diffusers gives each label table
  an extra row (11 rows) because its class-dropout probability is > 0, and row 10 is the null
  class ``DiTFamily.unconditional`` feeds.  diffusers would drop labels itself in train mode, but
  independently in every block (and again for the output layer); we switch that off.  The text
  families get a frozen random "text encoder" instead (:func:`reference_families.make_class_table`, seeded by
  ``--seed``): class ``k`` is a prompt of ``TEXT_LEN`` token embeddings, ``2 + k % 7`` of them
  real (the last one a shared end-of-prompt token, as T5 appends ``</s>``) and the rest padding
  (zero vectors, masked where the family takes a mask); row 10, the negative prompt, is the
  empty prompt (the end-of-prompt token alone).  FLUX's pooled projection per row is part of
  the table.  For every family the conditioning row is dropped once per sample: row -> 10 with
  probability ``--label-dropout`` (0.1), so the unconditional input is learned consistently.
* Diffusion: DiT and PixArt predict epsilon under cosine (``squaredcos_cap_v2``) betas, 1,000
  train timesteps drawn uniformly.  FLUX and Qwen-Image learn flow matching: ``sigma ~ U(0, 1)``,
  ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``, timestep input ``sigma``
  (the transformers scale it by 1,000 themselves).  MSE loss.
* Optimisation: AdamW (lr ``--lr``: DiT 1e-3, others 2e-3; betas (0.9, 0.999), weight decay
  0.01), batch ``--batch-size`` (DiT 128, others 64), linear warm-up over 200 steps then cosine
  decay to 10%, gradient norm clipped at 1, ``--steps`` steps (DiT 4,000, others 3,000); an EMA of the weights (decay 0.999, warmed up as
  ``min(decay, (1+n)/(10+n))``) is what gets saved.  ``torch.set_num_threads(2)``,
  deterministic algorithms, all randomness from explicit generators seeded by ``--seed``.
* Sampler: DiT and PixArt ship a ``DDIMScheduler`` with the training betas, ``clip_sample=False``,
  ``set_alpha_to_one=False``, ``timestep_spacing="leading"`` (25 steps: t = 960, 920, ..., 0).
  "trailing" (and "linspace") start at t = 999, where the cosine schedule's alpha_bar is
  2.4e-9: DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) then divides the model's eps error by
  5e-5 and every sample is ruined (measured on digits-dit: Frechet distance ~500 instead of ~4,
  accuracy 0.5, at any step count).  "leading" starts at t = 960 (alpha_bar 3.7e-3) and samples
  well.  FLUX and Qwen-Image ship ``FlowMatchEulerDiscreteScheduler`` configured as FLUX.1-dev's
  and Qwen-Image's (dynamic shifting; for 16 tokens mu ~ 0.46-0.5, i.e. a shift of ~1.6).
* ``default_scale``: the constant CFG scale with the lowest digits Frechet distance on
  calibration seeds (never the held-out seeds), among ``--scales``; conditional-only is scored
  beside them for reference.
* Classifier: :class:`rstr.metrics.DigitsClassifier`, trained on the train split of the real
  digits (see :func:`rstr.metrics.train_classifier`) with ``--family dit``; the other families
  ship a copy of digits-dit's, so every model directory is self-contained.

Outputs go to a temporary sibling of ``--out`` and are renamed into place when complete.
``rstr.json`` records the run (``recipe``: train and calibration seconds, CPU seconds, the mean
1-minute load average while training, torch version, device).  On a shared machine run with
``OMP_WAIT_POLICY=PASSIVE``: it changes no arithmetic, but OpenMP threads that spin while waiting
for a core made training up to 5x slower in wall-clock time under a load average of 7.  The
shipped text models took, on the 2-core machine under a load average of 7-8 from other jobs,
PixArt 2,491 s in all (training 2,033 s, 698 CPU-seconds), FLUX 1,440 s (1,013 s, 828) and
Qwen-Image 1,104 s (864 s, 937); calibration (6 x 1,000 images) took 235-447 s of that.

Usage::

    python tools/train_reference.py --family dit --seed 0      # -> rstr/reference/digits-dit
    OMP_WAIT_POLICY=PASSIVE python tools/train_reference.py --family flux --seed 0   # -> digits-flux
    python tools/train_reference.py --out rstr/reference/digits-dit --classifier-only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_families import (  # noqa: E402
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    REFERENCE_DIR,
    SAMPLE_STEPS,
    SPECS,
    TEXT_DIM,
    TEXT_LEN,
    Spec,
    conditioning,
    make_class_table,
    save_class_table,
)


# ----------------------------------------------------------------------------- training
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


def make_family(spec: Spec, transformer: nn.Module, scheduler, meta: dict):
    """The rstr family adapter around ``transformer`` (its ``denoise`` is the call we train and sample)."""
    from rstr.families import FAMILIES

    return FAMILIES[spec.family](transformer, scheduler, default_steps=SAMPLE_STEPS, meta=meta)


def train(spec: Spec, args: argparse.Namespace, table: dict[str, torch.Tensor], meta: dict) -> tuple[nn.Module, dict]:
    """Train ``spec``'s transformer and return its EMA copy (on the CPU) and a record of the run.

    Every random draw comes from one CPU generator, so ``--device`` changes only the arithmetic.
    """
    from diffusers import DDPMScheduler

    from rstr.families.flux import pack_latents
    from rstr.metrics import real_digits

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)
    images, labels = real_digits("all")
    images = (pack_latents(images) if spec.packed else images).to(dev)
    model = spec.make_transformer().to(dev)
    _disable_internal_label_dropout(model)
    family = make_family(spec, model, spec.make_scheduler(args.spacing), meta)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    acp = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.float().to(dev)
    table = {k: v.to(dev) for k, v in table.items()}

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
    loads: list[float] = []  # 1-minute load average, sampled every 50 steps
    t0, cpu0 = time.time(), time.process_time()
    bar = tqdm(range(args.steps), desc=f"train {spec.family}", mininterval=2.0)
    for step in bar:
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(labels), generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = NULL_CLASS
        x0 = images[idx.to(dev)]
        if spec.objective == "epsilon":
            t = torch.randint(0, 1000, (len(y),), generator=gen)
            noise = torch.randn((len(y), *images.shape[1:]), generator=gen)
            y, t, noise = y.to(dev), t.to(dev), noise.to(dev)
            a = acp[t].view(-1, *[1] * (x0.ndim - 1))
            xt, timestep, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise
        else:
            sigma = torch.rand(len(y), generator=gen)
            noise = torch.randn((len(y), 1, IMAGE_SIZE, IMAGE_SIZE), generator=gen)
            y, sigma, noise = y.to(dev), sigma.to(dev), pack_latents(noise).to(dev)
            s = sigma.view(-1, 1, 1)
            xt, timestep, target = (1 - s) * x0 + s * noise, sigma, noise - x0
        pred = family.denoise(xt, timestep, conditioning(spec, table, y))
        loss = nn.functional.mse_loss(pred, target)
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
            loads.append(os.getloadavg()[0])
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    losses = [float(v) for v in losses]
    record = {
        "train_seconds": round(time.time() - t0, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "load_average": round(sum(loads) / len(loads), 2),
        "final_loss_avg200": round(sum(losses[-200:]) / len(losses[-200:]), 5),
    }
    return ema.cpu(), record


# -------------------------------------------------------------------------- calibration
def choose_scale(
    out: Path, spec: Spec, scales: list[float], steps: int, num: int, device: str = "cpu"
) -> tuple[float, dict, dict]:
    """Score conditional-only and constant CFG at ``scales`` on calibration seeds; pick the lowest Frechet distance.

    The model is loaded from ``out`` by :func:`rstr.families.load_model` (its class table too) and
    scored by :func:`rstr.evaluate.evaluate`, the code path of every rstr command.
    """
    from rstr.evaluate import evaluate
    from rstr.families import load_model
    from rstr.metrics import load_classifier
    from rstr.schedule import GuidanceSchedule
    from rstr.seeds import CALIBRATION_SEEDS

    family = load_model(out, device=device)
    classifier = load_classifier(out / "classifier.safetensors")
    kw = dict(family=spec.family, sampler=family.sampler, default_steps=steps)

    def run(schedule, what: str) -> dict[str, float]:
        r = evaluate(
            family, schedule, num=num, groups=1, seed_start=CALIBRATION_SEEDS.start, classifier=classifier, progress=False
        )
        print(f"  calibration: {what}: FD {r.fd_mean:.3f}  accuracy {r.accuracy:.3f}", flush=True)
        return {"fd": round(r.fd_mean, 4), "accuracy": round(r.accuracy, 4)}

    table = {str(w): run(GuidanceSchedule.constant(w, steps, **kw), f"constant w={w}") for w in scales}
    cond_only = run(GuidanceSchedule.conditional_only(steps, **kw), "conditional-only")
    best = min(scales, key=lambda w: table[str(w)]["fd"])
    return best, table, cond_only


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(SPECS), default="dit", help="model family to train (default: %(default)s)")
    p.add_argument("--out", type=Path, help="model directory to write (default: rstr/reference/digits-<family>)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the family's: dit 4000, others 3000)")
    p.add_argument("--batch-size", type=int, help="(default: the family's: dit 128, others 64)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the family's: dit 1e-3, others 2e-3)")
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="probability a sample's class becomes the unconditional row (default: %(default)s)",
    )
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--spacing",
        choices=["leading", "trailing", "linspace"],
        default="leading",
        help="DDIM timestep spacing of dit and pixart (default: %(default)s; see the module docstring)",
    )
    p.add_argument("--scales", type=float, nargs="+", help="constant scales tried for default_scale (default: the family's)")
    p.add_argument("--calibration-num", type=int, default=1000, help="images per scale when choosing default_scale")
    p.add_argument(
        "--device", default="cpu", help="training device; the shipped models are trained on the CPU (default: %(default)s)"
    )
    p.add_argument("--classifier-only", action="store_true", help="retrain only the classifier of an existing --out")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an rstr model directory")
    args = p.parse_args(argv)
    spec = SPECS[args.family]
    args.out = args.out or REFERENCE_DIR / spec.name
    args.steps = args.steps or spec.steps
    args.batch_size = args.batch_size or spec.batch_size
    args.lr = args.lr or spec.lr
    args.scales = args.scales or list(spec.scales)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=args.device != "cpu")
    try:
        return _run(spec, args)
    except RstrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _classifier(spec: Spec, args: argparse.Namespace, tmp: Path) -> float:
    """Write ``classifier.safetensors`` into ``tmp`` and return its test accuracy.

    ``dit`` trains the shared digits classifier; the other families copy digits-dit's.
    """
    from safetensors import safe_open

    from rstr.metrics import save_classifier, train_classifier

    if spec.family == "dit":
        t0 = time.time()
        clf, acc = train_classifier(seed=args.seed)
        save_classifier(clf, tmp / "classifier.safetensors", {"test_accuracy": acc, "seed": args.seed})
        print(f"classifier: test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
        return acc
    shared = REFERENCE_MODEL / "classifier.safetensors"
    if not shared.is_file():
        raise RstrError(
            f"{shared} does not exist; train digits-dit first (`--family dit`) or its classifier (`--classifier-only`)"
        )
    shutil.copyfile(shared, tmp / "classifier.safetensors")
    with safe_open(str(shared), framework="pt") as f:
        return float(json.loads((f.metadata() or {}).get("info", "{}")).get("test_accuracy", float("nan")))


def _run(spec: Spec, args: argparse.Namespace) -> int:
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
    with atomic_dir(out, force=True) as tmp:
        clf_acc = _classifier(spec, args, tmp)
        table = make_class_table(spec, args.seed) if spec.table else {}
        meta = {
            "name": spec.name,
            "family": spec.family,
            "default_steps": SAMPLE_STEPS,
            "default_scale": None,
            "num_classes": NUM_CLASSES,
            "image": {"channels": 1, "size": IMAGE_SIZE, "range": [-1, 1]},
            "classifier": "classifier.safetensors",
            "classifier_config": {"class": "rstr.metrics.DigitsClassifier", "features": 64, "test_accuracy": round(clf_acc, 4)},
        }
        if spec.table:
            meta["text_len"] = TEXT_LEN
        if spec.packed:
            meta["latent_size"] = IMAGE_SIZE
        meta["seed"] = args.seed
        ema, record = train(spec, args, table, meta)
        if spec.objective == "epsilon":
            diffusion = {"prediction": "epsilon", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
        else:
            diffusion = {"prediction": "flow (x_t = (1 - s) x0 + s noise, target noise - x0)", "sigma_sampling": "uniform"}
        if spec.table:
            conditioning_info = {
                "prompt_dropout": args.label_dropout,
                "negative_row": NULL_CLASS,
                "text_dim": TEXT_DIM,
                "real_tokens": "2 + k % 7 for class k, 1 for the negative row",
            }
        else:
            conditioning_info = {"label_dropout": args.label_dropout, "null_class": NULL_CLASS}
        meta["recipe"] = {
            "data": "sklearn.datasets.load_digits, all 1797 images, [0,16] -> [-1,1]",
            **diffusion,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": "AdamW(betas=(0.9,0.999), weight_decay=0.01), warmup 200, cosine to 10%, clip 1.0",
            "lr": args.lr,
            **conditioning_info,
            "ema_decay": args.ema_decay,
            **({"timestep_spacing": args.spacing} if spec.objective == "epsilon" else {}),
            "classifier_test_accuracy": round(clf_acc, 4),
            "torch": torch.__version__,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            **record,
        }
        ema.save_pretrained(tmp / "transformer", safe_serialization=True)
        spec.make_scheduler(args.spacing).save_pretrained(tmp / "scheduler")
        if spec.table:
            save_class_table(tmp / "class_embeddings", spec, table)
        write_json(tmp / "rstr.json", meta)
        t_cal = time.time()
        best, fd_by_scale, cond_only = choose_scale(tmp, spec, args.scales, SAMPLE_STEPS, args.calibration_num, args.device)
        meta["default_scale"] = best
        meta["recipe"]["scale_calibration"] = {
            "steps": SAMPLE_STEPS,
            "num": args.calibration_num,
            "fd_by_scale": fd_by_scale,
            "conditional_only": cond_only,
            "seconds": round(time.time() - t_cal, 1),
        }
        meta["recipe"]["total_seconds"] = round(time.time() - t0, 1)
        write_json(tmp / "rstr.json", meta)
        for junk in tmp.rglob("__pycache__"):
            shutil.rmtree(junk, ignore_errors=True)
    print(f"wrote {out}: default_scale {best}, {time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
