"""What the build report states: quality against the stock model and speed, each measured side by side.

* **Quality** (:func:`measure_quality`): the bundle's model and schedule against the stock model
  -- freshly loaded, no adapter merged -- under constant CFG at the schedule's full step count,
  on held-out seeds (paired, per group; :mod:`rstr.compare`).  Only for models with a quality
  measure here (the digits metrics).
* **Speed** (:func:`measure_speed`): end-to-end seconds of PyTorch eager constant CFG at the
  schedule's full step count and of the bundle on ONNX Runtime, interleaved repetitions, medians,
  both on the same thread count.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from rstr.engines.bundle import Bundle
from rstr.export.verify import as_arrays

from rstr.compare import Comparison, compare, score, score_bundle
from rstr.families import load_model
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule
from rstr.seeds import HELD_OUT_SEEDS

REPORT_NUM, REPORT_GROUPS = 500, 2


def stock_constant_cfg(family: Family, schedule: GuidanceSchedule) -> GuidanceSchedule:
    """The baseline of every comparison: constant CFG at the model's scale and the schedule's full step count."""
    return family.constant_cfg(steps=schedule.default_steps, default_steps=schedule.default_steps)


def measure_quality(family: Family, schedule: GuidanceSchedule, bundle: Bundle | None = None) -> Comparison | None:
    """The bundle (``family`` as merged, ``schedule``) against the freshly loaded stock model on held-out seeds.

    With ``bundle`` (a reduced-precision one) its own outputs on ONNX Runtime CPU are scored, since
    the PyTorch model no longer computes what it does; otherwise the PyTorch sampler's (equal to an
    fp32 bundle's to the verification tolerance).
    """
    if family.quality != "digits":
        return None
    stock = load_model(family.path, device=family.device, prompts=family.prompts)
    kw = dict(seed_start=HELD_OUT_SEEDS.start, num=REPORT_NUM, groups=REPORT_GROUPS)
    baseline = score(stock, stock_constant_cfg(stock, schedule), "stock constant CFG", **kw)
    if bundle is None:
        return compare((family, schedule, "rstr bundle"), baseline, **kw)
    import tempfile
    from pathlib import Path

    from rstr.export.precision import cpu_checkable

    with tempfile.TemporaryDirectory(prefix="rstr-quality-") as tmp:
        side = score_bundle(
            cpu_checkable(bundle, Path(tmp)), family, schedule, f"rstr bundle ({bundle.manifest.precision})", **kw
        )
    return Comparison(side, baseline, HELD_OUT_SEEDS.start, REPORT_NUM, REPORT_GROUPS)


def measure_speed(family: Family, bundle: Bundle, schedule: GuidanceSchedule, reps: int = 5) -> dict:
    """Median end-to-end seconds, interleaved: PyTorch eager constant CFG vs the bundle (ONNX Runtime, same threads)."""
    from rstr.engines.onnxruntime import OnnxRuntimeRunner

    from rstr.sampler import sample

    b = bundle.batch
    cond, uncond = family.example_conditioning(b)
    noise = np.random.default_rng(0).standard_normal(bundle.sample.concrete(b), dtype=np.float32)
    baseline = stock_constant_cfg(family, schedule)
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {"pytorch_constant_cfg": [], "bundle": []}
    with OnnxRuntimeRunner(bundle, threads=threads) as runner:
        runs = {
            "pytorch_constant_cfg": lambda: sample(family, baseline, cond, uncond=uncond, noise=torch.from_numpy(noise)),
            "bundle": lambda: runner.infer(noise, *as_arrays(cond, uncond)),
        }
        for run in runs.values():
            run()  # warm-up
        for _ in range(reps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "baseline": f"PyTorch eager, {baseline.describe()}",
        "seconds": med,
        "threads": threads,
        "speedup": med["pytorch_constant_cfg"] / med["bundle"],
        "reps": reps,
    }
