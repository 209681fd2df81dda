#!/usr/bin/env python
"""Benchmark rstr against the stock diffusers pipelines and cache-dit, side by side, with quality.

One command writes ``docs/benchmarks.md``, ``docs/bench/results.json`` (every repetition)
and PNG plots under ``docs/bench/``::

    python tools/bench.py                                   # full run: all models, 5 reps
    python tools/bench.py --quick --models ref --reps 1 --out /tmp/x.md   # smoke run

Per model, every row runs on the same noise, conditioning and nominal step count:

1. ``diffusers``  the stock pipeline (DiTPipeline, PixArtAlphaPipeline, FluxPipeline,
   QwenImagePipeline), PyTorch eager, constant CFG -- the baseline;
2. ``diffusers-compile`` the same with ``torch.compile`` on its transformer (what a PyTorch user does);
3. ``cache-dit@T`` the same pipeline with cache-dit's DBCache configured to cache on the model
   (blocks that fit, threshold T swept, ``bench_pipelines.cache_dit_config``);
4. ``rstr-torch`` rstr's sampler with the rstr 50% schedule, PyTorch eager;
5. ``ort-cfg``    the exported bundle on ONNX Runtime (CPU), constant CFG;
6. ``ort-rstr[30][-P]`` the bundle on ONNX Runtime (CPU) at the 50% (``rstr``) or 30% (``rstr30``)
   searched schedule, at precision P (fp32 when absent; int8-dynamic, int8; bf16 is listed as not
   run on a CPU: ONNX Runtime has no CPU kernels for it);
7. ``trt-*``      the same on TensorRT when a GPU with TensorRT is present, else skipped.

Timing is interleaved (rep 1 of every row, then rep 2, ...; the order rotates each rep),
after one warm-up call per row, and reported as the median with the min-max spread.  See
``docs/benchmarks.md`` (written by this script) for what each column measures.

This file is the runner: it sets up each model's rows (``bench_rows.ModelBench``, from the
models and inputs of ``bench_setup.py`` and the pipelines and bundles of ``bench_pipelines.py``),
calls the measurements of ``bench_measure.py`` in order (each returns a record), collects the
records' JSON per model and hands it to ``bench_report.py``, which writes the report (its numbers
from ``bench_numbers.py``), ``results.json`` and the plots (``bench_plots.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_measure as measure  # noqa: E402
import bench_pipelines as pipelines  # noqa: E402
import bench_setup as setup  # noqa: E402
from bench_measure import Memory, Overhead, log  # noqa: E402
from bench_rows import ModelBench, at_batch  # noqa: E402
from bench_setup import MODELS, ROW_ENGINE, ROW_PRECISION, ROW_SCHEDULE, ROWS, is_cache_dit  # noqa: E402

CHILD_TAG = "BENCH_CHILD "


def memory_child(spec, key: str, mb: ModelBench, rstr_files: dict[str, Path], args) -> Memory | None:
    """Peak memory of row ``key`` in a fresh process (``child_main``); None if that process fails."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        key,
        "--models",
        spec.key,
        "--work",
        str(args.work),
        "--threads",
        str(args.threads),
        "--_rstr",
        ",".join(f"{k}={v}" for k, v in rstr_files.items()),
    ]
    if args.big_batch:
        cmd += ["--big-batch", str(args.big_batch)]
    if args.quick:
        cmd.append("--quick")
    if args.reference is not None:
        cmd += ["--reference", str(args.reference)]
    if ROW_ENGINE[key] == "ort":
        cmd += ["--_bundle", str(mb.bundle_dir(ROW_SCHEDULE[key], precision=ROW_PRECISION[key]))]
    log(f"  peak memory: {key} in a fresh process")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return Memory(**json.loads(line[len(CHILD_TAG) :]))
    log(f"  memory child for {key} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return None


def child_main(args) -> int:
    """Run one row once per batch in this fresh process; print its peak memory."""
    spec = MODELS[args.models[0]]
    key = args._child
    batches = [1] + ([args.big_batch or spec.big_batch] if spec.big_batch else [])
    if ROW_ENGINE[key] == "ort":  # torch-free: what a deployment of the bundle holds
        from rstr.engines.bundle import Bundle
        from rstr.engines.onnxruntime import OnnxRuntimeRunner

        bundle = Bundle.open(args._bundle)
        imports = measure.status_mb()
        for b in batches:
            noise, cond, uncond = pipelines.bundle_inputs_np(bundle, b)
            with OnnxRuntimeRunner(at_batch(bundle, b), threads=args.threads) as runner:
                runner.infer(noise, cond, uncond)
    else:
        import torch  # noqa: F401

        imports = measure.status_mb()
        files = dict(kv.split("=", 1) for kv in args._rstr.split(","))
        mb = ModelBench(spec, args, {k: None for k in files}, rstr_files={k: Path(v) for k, v in files.items()})
        fn = mb.torch_row(key, copy_transformer=False)  # cache-dit: on the one transformer, like a user would
        for b in batches:
            fn(b)
    print(CHILD_TAG + json.dumps(asdict(measure.peak_memory(imports))), flush=True)
    return 0


# ============================================================================== runner
def bench_model(spec, args, source_schedules: dict) -> dict:
    """Every measurement of one model, in order, collected into its results entry."""
    t_start = time.time()
    log(f"== {spec.key}: {spec.title}")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    peak = measure.matmul_peak(args.threads, _matmul_sizes(args), reps=3)
    mb = ModelBench(spec, args, source_schedules)
    res: dict = {**mb.describe(), "rows": {}, "loadavg": {"start": os.getloadavg()}, "started": started, "matmul": asdict(peak)}
    rstr_files = {k: args.work / "schedules" / f"{spec.key}-{k}.json" for k in mb.schedules if k != "cfg"}
    for kind, path in rstr_files.items():
        mb.schedules[kind].save(path)

    runs, skipped = mb.set_up_rows(args.rows)
    rows = res["rows"] = {
        key: {
            "label": setup.ROW_LABELS[key],
            "engine": ROW_ENGINE[key],
            "schedule": ROW_SCHEDULE[key],
            "precision": ROW_PRECISION[key],
            "skipped": skipped.get(key),
        }
        for key in ROWS
    }
    if any(ROW_ENGINE[k] == "ort" for k in runs):
        res["bundle_rel_error"] = mb.check_bundles()
        res["bundle_files_mb"] = mb.bundle_files_mb()
        res["precision_gates"] = mb.precision_gates()
        log(f"  bundles verified: {res['bundle_rel_error']}")

    for b in mb.batches:
        log(f"  end to end at batch {b}: {len(runs)} rows x {args.reps} reps (interleaved)")
        mb.session_log.clear()
        for key, spread in measure.end_to_end({k: partial(fn, b) for k, fn in runs.items()}, b, args.reps).items():
            rows[key].setdefault("e2e", {})[str(b)] = asdict(spread)
        for (key, _), calls in mb.session_log.items():  # ONNX Runtime rows: the same calls split by session
            steps = len(mb.row_bundle(key).steps)
            rows[key].setdefault("overhead", {})[str(b)] = asdict(Overhead.of(calls[-args.reps :], steps))  # no warm-up

    calls = mb.denoiser_calls(runs)
    log(f"  denoiser calls: {', '.join(sorted(calls))} x {max(args.reps, 5)} reps (interleaved)")
    res["denoiser_ms"] = {k: s.ms() for k, s in measure.denoiser_calls(calls, max(args.reps, 5)).items()}

    log("  FLOPs (torch FlopCounterMode)")
    x, t, cond = mb.denoiser_input(1, 1)
    pass_flops = measure.count_flops(partial(mb.family.denoise, x, t, cond))
    res["pass_gflop"] = pass_flops / 1e9
    for key, flops in measure.model_flops(mb, runs, pass_flops, args.count_full_runs and spec.key != "dit-xl").items():
        rows[key].update(asdict(flops))
    for key in [k for k in runs if is_cache_dit(k)]:  # what its FLOP-counted batch-1 run cached
        rows[key]["cache_dit_stats"] = pipelines.cache_dit_stats(mb.pipes[key])
        rows[key]["cache_dit_config"] = pipelines.cache_dit_config(mb.family, mb.steps, float(key.split("@")[1]))

    if spec.key == "ref" and not args.no_quality:
        log(f"  quality: {args.quality_groups} x {args.quality_num} held-out images per row")
        res["quality"] = asdict(measure.quality(mb, runs, args.quality_num, args.quality_groups))
    mb.close()
    res["loadavg"]["end"] = os.getloadavg()

    if args.memory:  # one fresh process per row
        for key in runs:
            mem = memory_child(spec, key, mb, rstr_files, args)
            rows[key]["peak_rss_mb"] = None if mem is None else asdict(mem)
    res["seconds"] = time.time() - t_start
    log(f"  {spec.key} done in {res['seconds']:.0f} s")
    return res


def _matmul_sizes(args) -> tuple[int, ...]:
    return (1024, 2048) if args.quick else (1024, 2048, 4096)


# ============================================================================ machine
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import onnxruntime
    import torch

    mem = None
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gb": mem,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "diffusers": diffusers.__version__,
        "cache_dit": pipelines.cache_dit_version(),
        "platform": platform.platform(),
    }


# ================================================================================= main
def parse(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, from {', '.join(MODELS)} (default: all; --quick: {', '.join(setup.QUICK_MODELS)})",
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)} (default: all)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per measurement (default 5; --quick 1)")
    p.add_argument(
        "--out",
        type=Path,
        default=setup.ROOT / "docs" / "benchmarks.md",
        help="markdown report; plots and results.json go to bench/ beside it",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 rep, 10 steps for DiT-S and the text models, 40 quality images, no memory children, "
        "no DiT-XL unless named",
    )
    p.add_argument(
        "--schedule", type=Path, default=None, help="the reference model's rstr schedule (default: best under docs/search/)"
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch and ONNX Runtime intra-op threads (default: all)"
    )
    p.add_argument(
        "--reference", type=Path, default=None, help="the reference model directory (default: rstr/reference/digits-dit)"
    )
    p.add_argument("--work", type=Path, default=setup.ROOT / "build" / "bench", help="cache of model directories and bundles")
    p.add_argument("--rebuild", action="store_true", help="re-export bundles even when cached")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other models' results from the existing bench/results.json beside --out (each model's rows "
        "are always measured together in one run; the report dates each model)",
    )
    p.add_argument("--quality-num", type=int, default=None, help="held-out images per seed group (default 500; --quick 40)")
    p.add_argument("--quality-groups", type=int, default=None, help="held-out seed groups (default 2; --quick 1)")
    p.add_argument("--no-quality", action="store_true", help="skip the reference model's FD/accuracy")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peak RSS per row in a fresh process (default: on; off with --quick)",
    )
    p.add_argument(
        "--count-full-runs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count FLOPs over a whole batch-1 generation for PyTorch rows too (default: on; off with --quick); "
        "cache-dit is always counted that way",
    )
    p.add_argument(
        "--big-batch",
        type=int,
        default=None,
        help="the larger batch of every model that has one (default: the model's own, e.g. 8 for ref, 2 for dit-s)",
    )
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_bundle", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_rstr", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    default = setup.QUICK_MODELS if args.quick else setup.DEFAULT_MODELS
    args.models = [m.strip() for m in args.models.split(",")] if args.models else list(default)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.rows = [r.strip() for r in args.rows.split(",")]
    if [r for r in args.rows if r not in ROWS] or "diffusers" not in args.rows:
        p.error(f"--rows takes a subset of {', '.join(ROWS)} that includes the diffusers baseline")
    args.reps = args.reps or (1 if args.quick else 5)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.quality_num = args.quality_num or (40 if args.quick else 500)
    args.quality_groups = args.quality_groups or (1 if args.quick else 2)
    if args.memory is None:
        args.memory = not args.quick
    if args.count_full_runs is None:
        args.count_full_runs = not args.quick
    args.work = args.work.resolve()
    if args.reference is not None:
        setup.REFERENCE = args.reference.resolve()
    return args


def source_schedules(args) -> tuple[dict, dict[str, str]]:
    """The reference model's searched schedules by kind (``rstr``: 50%, searched or hand-made; ``rstr30``: 30% if
    searched), with where each came from; the other models get them transferred."""
    from rstr.families import load_model
    from rstr.schedule import GuidanceSchedule

    try:
        ref = load_model(setup.reference_dir())
    except Exception as err:  # noqa: BLE001
        if args.schedule is not None:
            return {"rstr": GuidanceSchedule.load(args.schedule)}, {"rstr": str(args.schedule)}
        raise SystemExit(
            f"bench: error: cannot load the reference model ({err}); train it with "
            "`python tools/train_reference.py --out rstr/reference/digits-dit --seed 0`"
        ) from None
    found, where = {}, {}
    for kind, budget in setup.SCHEDULE_BUDGETS.items():
        s, w = setup.find_searched_schedule(ref, args.schedule if kind == "rstr" else None, budget)
        if s is None and kind == "rstr":
            s = setup.hand_schedule(ref, ref.default_steps, float(ref.meta.get("default_scale", 2.0)))
            w = "hand-made stand-in (no searched schedule under docs/search/): first third of 60% of the steps guided"
        if s is not None and (kind == "rstr" or s.to_dict() != found["rstr"].to_dict()):
            found[kind], where[kind] = s, w
    return found, where


def _partial(results: dict, args, t0: float, write_report) -> None:
    snap = dict(
        results,
        matmul_end=results["matmul_start"],
        contention_end=results["contention"],
        peak_gflops=results["matmul_start"]["gflops"],
        seconds=time.time() - t0,
        partial=True,
    )
    write_report(snap, args.out)


def main(argv=None) -> int:
    args = parse(argv)
    if args._child:
        return child_main(args)
    import torch

    torch.set_num_threads(args.threads)
    from bench_report import write_report

    t0 = time.time()
    scheds, where = source_schedules(args)
    for kind, sched in scheds.items():
        log(f"{kind} schedule: {where[kind]}; {sched.describe()}")
    sched = scheds["rstr"]
    results = {
        "command": "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "threads": args.threads,
        "reps": args.reps,
        "quick": args.quick,
        "schedule_source": where["rstr"],
        "source_schedule": sched.to_dict(),
        "schedule_describe": sched.describe(),
        "schedule_sources": where,
        "source_schedules": {k: {"schedule": v.to_dict(), "describe": v.describe()} for k, v in scheds.items()},
        "tensorrt": pipelines.tensorrt_unavailable() or "available",
        "models": {},
    }
    c = measure.contention_probe(args.threads)
    results["contention"] = asdict(c)
    log(f"contention probe: {c.ratio:.2f}x slower on {c.threads} threads than on 1 (load average {c.loadavg[0]:.1f})")
    if c.ratio > 2:
        log(
            "  WARNING: other jobs are competing for the cores; multi-threaded timings will be inflated "
            "(rerun on an idle machine, or with --threads 1)"
        )
    log("fp32 matmul peak ...")
    start = measure.matmul_peak(args.threads, _matmul_sizes(args))
    results["matmul_start"] = asdict(start)
    log(f"  {start.gflops:.1f} GFLOP/s")
    old = args.out.parent / "bench" / "results.json"
    if args.update and old.is_file():
        previous = json.loads(old.read_text()).get("models", {})
        results["models"] = {k: v for k, v in previous.items() if k not in args.models}
        results["updated"] = sorted(results["models"])
    for key in args.models:
        try:
            results["models"][key] = bench_model(MODELS[key], args, scheds)
            results["models"][key].update(
                threads=args.threads, reps=args.reps, schedule_source=where["rstr"], schedule_sources=where
            )
        except Exception as err:  # noqa: BLE001 - one model failing must not lose the others
            import traceback

            traceback.print_exc()
            results["models"][key] = {"key": key, "title": MODELS[key].title, "error": f"{type(err).__name__}: {err}"}
        _partial(results, args, t0, write_report)  # a report after every model: an interrupted run keeps what it measured
    end = measure.matmul_peak(args.threads, _matmul_sizes(args))
    results["matmul_end"] = asdict(end)
    results["contention_end"] = asdict(measure.contention_probe(args.threads))
    # The peak: the best rate seen at any of this run's measurements (start, before each model, end).
    seen = [start.gflops, end.gflops]
    seen += [m["matmul"]["gflops"] for k, m in results["models"].items() if k in args.models and "matmul" in m]
    results["peak_gflops"] = max(seen)
    for key in args.models:
        results["models"][key]["peak_gflops"] = results["peak_gflops"]
    results["seconds"] = time.time() - t0
    paths = write_report(results, args.out)
    log(f"wrote {', '.join(str(p) for p in paths)} in {results['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
