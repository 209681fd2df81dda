"""What ``tools/bench.py`` measures: one function per measurement, each returning a small record.

The functions take the calls to measure (closures over one model's rows, set up by
``bench.ModelBench``) and know nothing about the command line or the report; the runner in
``bench.py`` interleaves and collects them, and ``bench_report.py`` writes the report from
the records' JSON (``dataclasses.asdict``).
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from bench_setup import ROW_ENGINE, ROW_SCHEDULE, is_cache_dit

if TYPE_CHECKING:
    from bench_rows import ModelBench


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================ records
@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity: median with the min-max spread, and every value."""

    median: float
    min: float
    max: float
    n: int
    all: list[float]

    @classmethod
    def of(cls, xs: list[float]) -> Spread:
        return cls(statistics.median(xs), min(xs), max(xs), len(xs), list(xs))

    def ms(self) -> dict[str, float]:
        """Seconds as milliseconds, without the individual values (the denoiser-call table)."""
        return {"median": self.median * 1e3, "min": self.min * 1e3, "max": self.max * 1e3, "n": self.n}


@dataclass(frozen=True)
class MatmulPeak:
    """fp32 matmul rate of this machine: GFLOP/s by matrix size (fastest and median rep), best size."""

    gflops_by_size: dict[str, float]
    median_gflops_by_size: dict[str, float]
    gflops: float
    threads: int


@dataclass(frozen=True)
class Contention:
    """A small-matmul loop on all cores vs on one thread; ``ratio`` > 1 means other jobs hold the cores."""

    threads: int
    us_per_call_1_thread: float
    us_per_call_n_threads: float
    ratio: float
    loadavg: tuple[float, float, float]


@dataclass(frozen=True)
class Overhead:
    """An ONNX Runtime row's ``infer`` split into denoiser sessions, step-graph sessions and host time (medians)."""

    infer_ms: float
    denoiser_ms: float
    step_graphs_ms: float
    host_ms: float
    outside_denoiser_fraction: float
    host_fraction: float
    steps: int
    n: int

    @classmethod
    def of(cls, calls: list[tuple[float, float, float]], steps: int) -> Overhead:
        """From ``(infer, denoiser, step graphs)`` seconds per timed call."""
        infer = [c[0] for c in calls]
        host = [i - d - s for i, d, s in calls]
        med = statistics.median
        return cls(
            med(infer) * 1e3,
            med([c[1] for c in calls]) * 1e3,
            med([c[2] for c in calls]) * 1e3,
            med(host) * 1e3,
            med([(i - d) / i for i, d, _ in calls]),
            med([h / i for h, i in zip(host, infer)]),
            steps,
            len(calls),
        )


@dataclass(frozen=True)
class Flops:
    """Work per image of one row: counted over a whole generation, or one pass times the passes per image."""

    gflop_per_image: float
    passes_per_image: float
    flops_counted: bool


@dataclass(frozen=True)
class RowQuality:
    """Held-out FD and accuracy of one row, per seed group, and the seconds to generate and score them."""

    fd: list[float]
    accuracy: list[float]
    fd_mean: float
    accuracy_mean: float
    seconds: float


@dataclass(frozen=True)
class Quality:
    """Every row's quality on the same held-out seeds ``[seeds[0], seeds[1])`` in ``groups`` groups of ``num``."""

    num: int
    groups: int
    seeds: list[int]
    rows: dict[str, RowQuality]


@dataclass(frozen=True)
class Memory:
    """Peak resident memory of a process that ran one row (``VmHWM``), and after its imports."""

    peak_rss_mb: float
    ru_maxrss_mb: float
    after_imports_mb: float
    torch_imported: bool


# ================================================================================ timing
def interleaved(fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up, then ``reps`` rounds of one call each, order rotating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(reps):
        shift = r % len(keys) if keys else 0
        gc.collect()
        gc.disable()  # no collector pauses inside a round; one collection between rounds
        try:
            for k in keys[shift:] + keys[:shift]:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return times


def matmul_peak(threads: int, sizes: tuple[int, ...] = (1024, 2048, 4096), reps: int = 5) -> MatmulPeak:
    """fp32 matmul rate (torch.matmul on ``threads`` threads): best over sizes of the fastest rep.

    The fastest repetition, not the median: this is the physical limit the rows are compared
    with, and on a shared machine the median understates it.
    """
    import torch

    best, median = {}, {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            ts.append(time.perf_counter() - t0)
        best[str(n)] = 2 * n**3 / min(ts) / 1e9
        median[str(n)] = 2 * n**3 / statistics.median(ts) / 1e9
    return MatmulPeak(best, median, max(best.values()), threads)


def contention_probe(threads: int, calls: int = 300) -> Contention:
    """Small-matmul loop on all cores vs on one thread: on an idle machine the ratio is <= 1.

    When other jobs hold the cores, every parallel region waits for a descheduled worker and
    the multi-threaded loop becomes many times slower than the single-threaded one.
    """
    import torch

    x, w = torch.randn(64, 256), torch.randn(256, 256)

    def run(n: int) -> float:
        torch.set_num_threads(n)
        for _ in range(20):
            x @ w
        t0 = time.perf_counter()
        for _ in range(calls):
            x @ w
        return (time.perf_counter() - t0) / calls

    probe = max(threads, os.cpu_count() or 1)  # always probe all cores, whatever --threads is
    one, many = run(1), run(probe)
    torch.set_num_threads(threads)
    return Contention(probe, one * 1e6, many * 1e6, many / one, os.getloadavg())


# ========================================================================= ORT overhead
class SessionClock:
    """Seconds spent inside an ONNX Runtime runner's session calls since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.denoiser = self.steps = 0.0

    def reset(self) -> None:
        self.denoiser = self.steps = 0.0


class _TimedSession:
    """Wraps an ORT session: adds the seconds spent inside ``run_with_iobinding`` to a clock."""

    def __init__(self, session, clock: SessionClock, denoiser: bool):
        self._session, self._clock, self._denoiser = session, clock, denoiser

    def run_with_iobinding(self, binding, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._session.run_with_iobinding(binding, *args, **kwargs)
        finally:
            if self._denoiser:
                self._clock.denoiser += time.perf_counter() - t0
            else:
                self._clock.steps += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._session, name)


def instrument(runner) -> SessionClock:
    """Wrap an active runner's sessions so each ``infer`` can be split into denoiser / step-graph / host time.

    The wrapper costs two ``perf_counter`` calls per session call (about a microsecond, counted
    as host time); the library is not changed.
    """
    clock = SessionClock()
    runner.sessions = {g: _TimedSession(s, clock, g == "denoiser") for g, s in runner.sessions.items()}
    return clock


# ======================================================================== measurements
def end_to_end(calls: Mapping[str, Callable[[], Any]], batch: int, reps: int) -> dict[str, Spread]:
    """Seconds per image of each row's whole generation at ``batch``, interleaved."""
    return {k: Spread.of([t / batch for t in ts]) for k, ts in interleaved(calls, reps).items()}


def denoiser_calls(calls: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, Spread]:
    """Seconds of one transformer call per engine and row count (``torch@2``, ``ort@1``, ...), interleaved."""
    return {k: Spread.of(ts) for k, ts in interleaved(calls, reps).items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn`` runs (torch FlopCounterMode).

    torch's counter has no formula for the CPU flash-attention kernel that SDPA dispatches to
    here; it gets the standard SDPA formula (4 * B * H * S * S_kv * D).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def nominal_flops(pass_flops: int, passes_per_image: float) -> Flops:
    """A row's work per image as its passes times one pass (bundle rows: the sampler's arithmetic, verified equal)."""
    return Flops(pass_flops * passes_per_image / 1e9, passes_per_image, False)


def counted_flops(generation: Callable[[], Any], pass_flops: int, passes_per_image: float | None = None) -> Flops:
    """A row's work per image counted over ``generation`` (one batch-1 run).

    ``passes_per_image`` None: the count over one pass's (cache-dit skips a varying share of the blocks).
    """
    flops = count_flops(generation)
    return Flops(flops / 1e9, flops / pass_flops if passes_per_image is None else passes_per_image, True)


def row_quality(groups: list[tuple[float, float]], seconds: float) -> RowQuality:
    """One row's record from its ``(FD, accuracy)`` per seed group."""
    fds, accs = [g[0] for g in groups], [g[1] for g in groups]
    return RowQuality(fds, accs, float(np.mean(fds)), float(np.mean(accs)), seconds)


def status_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (VmRSS: now; VmHWM: peak of this process image)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory(after_imports_mb: float) -> Memory:
    """This process's peak memory so far.

    VmHWM, not ru_maxrss: Linux folds the parent's high-water mark into the child's ru_maxrss at exec.
    """
    return Memory(
        status_mb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, after_imports_mb, "torch" in sys.modules
    )


# ======================================================== measurements of one model's rows
def model_flops(mb: ModelBench, runs: dict, pass_flops: int, count_full_runs: bool) -> dict[str, Flops]:
    """FLOPs per image of every row: cache-dit (and with ``count_full_runs`` every PyTorch row) counted over a batch-1
    generation; the others, whose arithmetic the PyTorch sampler's is verified equal to, as passes x one pass."""
    out = {}
    for key, fn in runs.items():
        passes = mb.schedules[ROW_SCHEDULE[key]].passes_per_image
        if is_cache_dit(key):
            out[key] = counted_flops(partial(fn, 1), pass_flops)
        elif count_full_runs and ROW_ENGINE[key] == "torch" and key != "diffusers-compile":  # compiled: diffusers' arithmetic
            out[key] = counted_flops(partial(fn, 1), pass_flops, passes)
        else:
            out[key] = nominal_flops(pass_flops, passes)
    return out


def quality(mb: ModelBench, runs: dict, num: int, groups: int) -> Quality:
    """Held-out FD and accuracy of every row, same seeds and labels (``i % classes``) for all.

    rstr-torch goes through ``rstr.evaluate.evaluate``; the other rows run on the same per-seed
    noise (``rstr.evaluate.noise_for_seeds``) and are scored with the same classifier features
    and reference statistics.
    """
    import torch

    from rstr.evaluate import evaluate
    from rstr.metrics import frechet_distance, load_classifier, reference_stats
    from rstr.seeds import HELD_OUT_SEEDS

    f = mb.family
    start = HELD_OUT_SEEDS.start
    clf = load_classifier(Path(f.path) / f.meta.get("classifier", "classifier.safetensors"))
    ref_stats = reference_stats(clf)
    labels = torch.arange(num) % f.num_classes

    def score(images) -> tuple[float, float]:
        images = images.float().clamp(-1, 1)
        return frechet_distance(clf.features(images), ref_stats), float((clf.logits(images).argmax(1) == labels).float().mean())

    rows = {}
    for key in runs:
        t0 = time.perf_counter()
        if key == "rstr-torch":
            r = evaluate(f, mb.rstr, num=num, groups=groups, seed_start=start, progress=False)
            scores = list(zip(r.fd, r.accuracy_per_group))
        else:
            with mb.held_out_images(key, labels) as generate:
                scores = [score(generate(list(range(start + g * num, start + (g + 1) * num)))) for g in range(groups)]
        rows[key] = row_quality(scores, time.perf_counter() - t0)
        log(f"  quality {key}: FD {rows[key].fd_mean:.3f}, accuracy {rows[key].accuracy_mean:.3f}")
    return Quality(num, groups, [start, start + num * groups], rows)
