#!/usr/bin/env python
"""Benchmark rstr against the stock diffusers pipelines and cache-dit, side by side, with quality.

One command writes ``docs/benchmarks.md``, ``docs/bench/results.json`` (every repetition)
and PNG plots under ``docs/bench/``::

    python tools/bench.py                                   # full run: all models, 5 reps
    python tools/bench.py --quick --models ref --reps 1 --out /tmp/x.md   # smoke run

Per model, every row runs on the same noise, conditioning and nominal step count:

1. ``diffusers``  the stock pipeline (DiTPipeline, PixArtAlphaPipeline, FluxPipeline,
   QwenImagePipeline), PyTorch eager, constant CFG -- the baseline;
2. ``cache-dit``  the same pipeline after ``cache_dit.enable_cache(pipe)`` (its defaults);
3. ``rstr-torch`` rstr's sampler with the rstr schedule, PyTorch eager;
4. ``ort-cfg``    the exported bundle on ONNX Runtime (CPU), constant CFG;
5. ``ort-rstr``   the exported bundle on ONNX Runtime (CPU), rstr schedule;
6. ``trt-*``      the same on TensorRT when a GPU with TensorRT is present, else skipped.

Timing is interleaved (rep 1 of every row, then rep 2, ...; the order rotates each rep),
after one warm-up call per row, and reported as the median with the min-max spread.  See
``docs/benchmarks.md`` (written by this script) for what each column measures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import bench_setup as setup  # noqa: E402
from bench_setup import MODELS, ROW_ENGINE, ROW_SCHEDULE, ROWS  # noqa: E402

CHILD_TAG = "BENCH_CHILD "


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================ timing
def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
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


def stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


def matmul_peak(threads: int, sizes=(1024, 2048, 4096), reps: int = 5) -> dict:
    """fp32 matmul rate of this machine (torch.matmul on ``threads`` threads): best over sizes of the fastest rep.

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
    return {"gflops_by_size": best, "median_gflops_by_size": median, "gflops": max(best.values()), "threads": threads}


def contention_probe(threads: int, calls: int = 300) -> dict:
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
    return {"threads": probe, "us_per_call_1_thread": one * 1e6, "us_per_call_n_threads": many * 1e6, "ratio": many / one,
            "loadavg": os.getloadavg()}


# ================================================================================= FLOPs
def count_flops(fn) -> int:
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


# ========================================================================= ORT overhead
class _TimedSession:
    """Wraps an ORT session: counts the seconds spent inside ``run_with_iobinding``."""

    def __init__(self, session, acc: dict, key: str):
        self._session, self._acc, self._key = session, acc, key

    def run_with_iobinding(self, binding, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._session.run_with_iobinding(binding, *args, **kwargs)
        finally:
            self._acc[self._key] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._session, name)


def instrument(runner) -> dict:
    """Wrap an active runner's sessions so each ``infer`` can be split into denoiser / step-graph / host time.

    The wrapper costs two ``perf_counter`` calls per session call (about a microsecond, counted
    as host time); the library is not changed.
    """
    acc = {"denoiser": 0.0, "steps": 0.0}
    runner.sessions = {g: _TimedSession(s, acc, "denoiser" if g == "denoiser" else "steps") for g, s in runner.sessions.items()}
    return acc


# ============================================================================ one model
class ModelBench:
    """Rows of one model, built lazily (a memory child builds only its own row)."""

    def __init__(self, spec, args, source_schedule, rstr_file: Path | None = None):
        import torch

        from rstr.families import load_model
        from rstr.schedule import GuidanceSchedule

        self.spec, self.args = spec, args
        steps = spec.quick_steps if args.quick and spec.quick_steps else spec.steps
        self.dir = setup.model_dir(spec, args.work, steps, log=log)
        self.family = load_model(self.dir)
        f = self.family
        if spec.config is None:  # the reference model: its own step count and CFG scale
            steps = f.default_steps
            self.scale = float(f.meta.get("default_scale", spec.scale))
        else:
            self.scale = spec.scale
        self.steps = steps
        self.cfg = GuidanceSchedule.constant(self.scale, steps, family=f.name, sampler=f.sampler, default_steps=steps)
        if rstr_file is not None:
            self.rstr = GuidanceSchedule.load(rstr_file)
        elif spec.key == "ref":
            self.rstr = source_schedule
        else:
            self.rstr = setup.transfer_schedule(source_schedule, f, steps)
        self.schedules = {"cfg": self.cfg, "rstr": self.rstr}
        self.batches = [1] + ([spec.big_batch] if spec.big_batch else [])
        self.inputs = {b: setup.make_inputs(f, b) for b in self.batches}
        self.bundles: dict[str, object] = {}
        self.runners: dict[tuple[str, int], object] = {}
        self.pipes: dict[str, object] = {}
        self.session_log: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        torch.set_num_threads(args.threads)

    # ------------------------------------------------------------------ reasons to skip
    def skip_reason(self, key: str) -> str | None:
        if key in self.spec.skip:
            return self.spec.skip[key]
        if key == "cache-dit":
            return setup.cache_dit_unavailable(self.family)
        if ROW_ENGINE[key] == "trt":
            return setup.tensorrt_unavailable()
        return None

    # ------------------------------------------------------------------------ torch rows
    def pipeline(self, key: str, copy_transformer: bool = True):
        if key not in self.pipes:
            if key == "diffusers":
                self.pipes[key] = setup.stock_pipeline(self.family, self.family.transformer)
            else:
                self.pipes[key] = setup.cache_dit_pipeline(self.family, copy_transformer=copy_transformer)
        return self.pipes[key]

    def torch_row(self, key: str, copy_transformer: bool = True):
        from rstr.sampler import sample

        f = self.family
        if key in ("diffusers", "cache-dit"):
            pipe = self.pipeline(key, copy_transformer)
            return lambda b: setup.call_pipeline(pipe, f, self.inputs[b], self.steps, self.scale)
        return lambda b: sample(f, self.rstr, self.inputs[b].cond, uncond=self.inputs[b].uncond, noise=self.inputs[b].noise)

    # -------------------------------------------------------------------------- bundles
    def bundle_dir(self, kind: str, backend: str = "onnxruntime") -> Path:
        tag = self.dir.name if self.spec.config is not None else setup.file_digest(
            self.dir / "transformer" / "diffusion_pytorch_model.safetensors")
        digest = setup._digest([tag, self.schedules[kind].to_dict(), backend])
        return self.args.work / "bundles" / f"{self.spec.key}-{kind}-{backend}-{digest}"

    def bundle(self, kind: str):
        if kind not in self.bundles:
            self.bundles[kind] = setup.build_bundle(self.dir, self.schedules[kind], self.bundle_dir(kind), log,
                                                    rebuild=self.args.rebuild)
        return self.bundles[kind]

    def runner(self, kind: str, batch: int):
        from rstr.engines.onnxruntime import OnnxRuntimeRunner

        if (kind, batch) not in self.runners:
            r = OnnxRuntimeRunner(setup.replan(self.bundle(kind), batch), threads=self.args.threads)
            r.activate()
            r.session_time = instrument(r)
            self.runners[(kind, batch)] = r
        return self.runners[(kind, batch)]

    def ort_row(self, key: str):
        kind = ROW_SCHEDULE[key]
        self.bundle(kind)  # export now, so that a failing export is reported as this row's reason

        def run(b):
            inp = self.inputs[b]
            r = self.runner(kind, b)
            r.session_time["denoiser"] = r.session_time["steps"] = 0.0
            t0 = time.perf_counter()
            out = r.infer(inp.noise_np, inp.np("cond"), inp.np("uncond"))
            t = time.perf_counter() - t0
            self.session_log.setdefault((key, b), []).append((t, r.session_time["denoiser"], r.session_time["steps"]))
            return out

        return run

    def trt_row(self, key: str):
        from rstr.engines.tensorrt import TensorRTRunner

        kind = ROW_SCHEDULE[key]
        out = self.bundle_dir(kind, "tensorrt")
        bundle = setup.build_bundle(self.dir, self.schedules[kind], out, log, backend="tensorrt", rebuild=self.args.rebuild)
        runners = {}

        def run(b):
            if b not in runners:
                runners[b] = TensorRTRunner(setup.replan(bundle, b))
                runners[b].activate()
            inp = self.inputs[b]
            return runners[b].infer(inp.noise_np, inp.np("cond"), inp.np("uncond"))

        return run

    def row(self, key: str):
        engine = ROW_ENGINE[key]
        return self.torch_row(key) if engine == "torch" else self.ort_row(key) if engine == "ort" else self.trt_row(key)

    def check_bundles(self) -> dict:
        """Max relative error of every bundle walk used, against the PyTorch sampler (same noise)."""
        from rstr.export.plan import build_plan
        from rstr.export.verify import verify

        out = {}
        for kind in ("cfg", "rstr"):
            if kind not in self.bundles:
                continue
            bundle = self.bundles[kind]
            out[f"{kind}@1"] = bundle.manifest["verification"]["max_rel_error"]  # verified by build()
            for b in self.batches[1:]:
                re = setup.replan(bundle, b)
                if re.manifest["plan"]["steps"] != build_plan(self.family, self.schedules[kind], b)["steps"]:
                    raise RuntimeError(f"replanned {kind} bundle at batch {b} differs from build_plan")
                out[f"{kind}@{b}"] = verify(re, self.family, self.schedules[kind], raise_on_failure=False).max_rel_error
        return out

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()
        self.runners.clear()


# ====================================================================== measure a model
def bench_model(spec, args, source_schedule) -> dict:
    import torch

    from rstr.families.base import expand_timestep
    from rstr.sampler import pair

    t_start = time.time()
    log(f"== {spec.key}: {spec.title}")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    peak = matmul_peak(args.threads, (1024, 2048) if args.quick else (1024, 2048, 4096), reps=3)
    mb = ModelBench(spec, args, source_schedule)
    f = mb.family
    res: dict = {
        "key": spec.key, "title": spec.title, "shape": spec.shape, "family": f.name, "steps": mb.steps, "scale": mb.scale,
        "batches": mb.batches, "parameters": sum(p.numel() for p in f.transformer.parameters()),
        "blocks": len(f.blocks()), "schedules": {k: {"describe": s.describe(), "passes": s.passes_per_image,
                                                       "compute_fraction": s.compute_fraction, "schedule": s.to_dict()}
                                                   for k, s in mb.schedules.items()},
        "rows": {}, "loadavg": {"start": os.getloadavg()}, "started": started, "matmul": peak,
    }
    rstr_file = args.work / "schedules" / f"{spec.key}-rstr.json"
    mb.rstr.save(rstr_file)

    # ---- rows that run here, and why the others do not
    runs, skipped = {}, {}
    for key in ROWS:
        why = mb.skip_reason(key) or (None if key in args.rows else "not selected (--rows)")
        if why is None:
            try:
                runs[key] = mb.row(key)
            except Exception as err:  # noqa: BLE001 - a row that cannot be set up is reported, not fatal
                why = f"setup failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log(f"  {key}: {why}")
        if why is not None:
            skipped[key] = why
    for key in ROWS:
        res["rows"][key] = {"label": setup.ROW_LABELS[key], "engine": ROW_ENGINE[key], "schedule": ROW_SCHEDULE[key],
                            "skipped": skipped.get(key)}
    if "ort-cfg" in runs or "ort-rstr" in runs:
        for kind in {ROW_SCHEDULE[k] for k in runs if ROW_ENGINE[k] == "ort"}:
            mb.bundle(kind)
        res["bundle_rel_error"] = mb.check_bundles()
        res["bundle_files_mb"] = {k: sum(e["bytes"] for e in b.manifest["files"].values()) / 2**20 for k, b in mb.bundles.items()}
        log(f"  bundles verified: {res['bundle_rel_error']}")

    # ---- end to end, interleaved, per batch
    for b in mb.batches:
        reps = args.reps
        log(f"  end to end at batch {b}: {len(runs)} rows x {reps} reps (interleaved)")
        mb.session_log.clear()
        times = interleaved({k: (lambda fn=fn, b=b: fn(b)) for k, fn in runs.items()}, reps)
        for k, ts in times.items():
            res["rows"][k].setdefault("e2e", {})[str(b)] = stats([t / b for t in ts])  # seconds per image
        # ONNX Runtime rows: the same calls split into time inside the sessions and time outside them
        for (k, bb), log_ in mb.session_log.items():
            rec = log_[-reps:]  # drop the warm-up call
            infer = [r[0] for r in rec]
            host = [i - d - st for i, d, st in rec]
            res["rows"][k].setdefault("overhead", {})[str(bb)] = {
                "infer_ms": statistics.median(infer) * 1e3, "denoiser_ms": statistics.median([r[1] for r in rec]) * 1e3,
                "step_graphs_ms": statistics.median([r[2] for r in rec]) * 1e3, "host_ms": statistics.median(host) * 1e3,
                "outside_denoiser_fraction": statistics.median([(i - d) / i for i, d, _ in rec]),
                "host_fraction": statistics.median([h / i for h, i in zip(host, infer)]),
                "steps": len(mb.bundle(ROW_SCHEDULE[k]).steps), "n": len(rec),
            }

    # ---- denoiser calls by kind (B and 2B rows), per engine
    step_fns = {}
    for b in mb.batches:
        inp = mb.inputs[b]
        for n, cond in ((b, inp.cond), (2 * b, None)):
            if cond is None:
                uncond = inp.uncond if inp.uncond is not None else f.unconditional(inp.cond)
                cond = pair(inp.cond, uncond)
            x = torch.cat([inp.noise] * (n // b))
            t = expand_timestep(f.model_timestep(mb.family.fresh_scheduler().config.num_train_timesteps // 2), n, x.device)
            if any(ROW_ENGINE[k] == "torch" for k in runs):
                step_fns[f"torch@{n}"] = lambda x=x, t=t, cond=cond: _torch_call(f, x, t, cond)
            if any(ROW_ENGINE[k] == "ort" for k in runs):
                kind = "rstr" if "ort-rstr" in runs else "cfg"
                step_fns[f"ort@{n}"] = _ort_call(mb.runner(kind, b), x, t, cond)
    log(f"  denoiser calls: {', '.join(sorted(step_fns))} x {max(args.reps, 5)} reps (interleaved)")
    step_times = interleaved(step_fns, max(args.reps, 5))
    res["denoiser_ms"] = {k: {kk: (vv * 1e3 if kk in ("median", "min", "max") else vv) for kk, vv in stats(v).items() if kk != "all"}
                          for k, v in step_times.items()}

    # ---- FLOPs
    log("  FLOPs (torch FlopCounterMode)")
    x1 = mb.inputs[1].noise
    t1 = expand_timestep(f.model_timestep(500), 1, x1.device)
    pass_flops = count_flops(lambda: f.denoise(x1, t1, mb.inputs[1].cond))
    res["pass_gflop"] = pass_flops / 1e9
    counted = args.count_full_runs and spec.key != "dit-xl"
    for key, fn in runs.items():
        sched = mb.schedules[ROW_SCHEDULE[key]]
        if key == "cache-dit" or (counted and ROW_ENGINE[key] == "torch"):
            flops = count_flops(lambda fn=fn: fn(1))
            res["rows"][key]["flops_counted"] = True
            if key == "cache-dit":
                res["rows"][key]["cache_dit_stats"] = setup.cache_dit_stats(mb.pipes["cache-dit"])
        else:
            flops = pass_flops * sched.passes_per_image
            res["rows"][key]["flops_counted"] = False
        res["rows"][key]["gflop_per_image"] = flops / 1e9
        res["rows"][key]["passes_per_image"] = flops / pass_flops if key == "cache-dit" else sched.passes_per_image

    # ---- quality (reference model: held-out seeds)
    if spec.key == "ref" and not args.no_quality:
        log(f"  quality: {args.quality_groups} x {args.quality_num} held-out images per row")
        res["quality"] = quality(mb, runs, args)

    mb.close()
    mb.pipes.clear()
    res["loadavg"]["end"] = os.getloadavg()

    # ---- peak memory: one fresh process per row
    if args.memory:
        for key in runs:
            res["rows"][key]["peak_rss_mb"] = memory_child(spec, key, mb, rstr_file, args)
    res["seconds"] = time.time() - t_start
    log(f"  {spec.key} done in {res['seconds']:.0f} s")
    return res


def _torch_call(family, x, t, cond):
    import torch

    with torch.no_grad():
        return family.denoise(x, t, cond)


def _ort_call(runner, x, t, cond):
    """One denoiser session call at ``len(x)`` rows, bound the way the runner binds a step."""
    import onnxruntime

    def value(a: np.ndarray):
        return onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), runner.device, 0)

    sess = runner.sessions["denoiser"]
    values = {"sample": value(x.numpy()), "timestep": value(t.numpy())}
    for d in runner.bundle.cond_inputs:
        values[d.name] = value(cond[d.name].numpy().astype(d.np_dtype))

    def call():
        binding = sess.io_binding()
        for name, v in values.items():
            binding.bind_ortvalue_input(name, v)
        binding.bind_output("model_output", runner.device)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    return call


# =============================================================================== quality
def quality(mb: ModelBench, runs: dict, args) -> dict:
    """Held-out FD and accuracy of every row, same seeds and labels (``i % 10``) for all.

    rstr-torch goes through ``rstr.evaluate.evaluate``; the pipelines and bundles are run on the
    same per-seed noise (``rstr.evaluate.noise_for_seeds``) and scored with the same classifier
    features and reference statistics.  cache-dit runs one image per call (its cache decisions
    look at the whole batch, and batch 1 is the latency setting timed above).
    """
    import torch

    from rstr.engines.onnxruntime import OnnxRuntimeRunner
    from rstr.evaluate import evaluate, noise_for_seeds
    from rstr.seeds import HELD_OUT_SEEDS
    from rstr.metrics import frechet_distance, load_classifier, reference_stats

    f = mb.family
    num, groups = args.quality_num, args.quality_groups
    start = HELD_OUT_SEEDS.start
    clf = load_classifier(Path(f.path) / f.meta.get("classifier", "classifier.safetensors"))
    ref_stats = reference_stats(clf)
    labels = torch.arange(num) % f.num_classes

    def score(images: torch.Tensor) -> tuple[float, float]:
        images = images.float().clamp(-1, 1)
        return frechet_distance(clf.features(images), ref_stats), float((clf.logits(images).argmax(1) == labels).float().mean())

    out = {"num": num, "groups": groups, "seeds": [start, start + num * groups], "rows": {}}
    for key in runs:
        t0 = time.perf_counter()
        fds, accs = [], []
        if key == "rstr-torch":
            r = evaluate(f, mb.rstr, num=num, groups=groups, seed_start=start, progress=False)
            fds, accs = r.fd, r.accuracy_per_group
        else:
            runner = None
            if ROW_ENGINE[key] == "ort":
                runner = OnnxRuntimeRunner(setup.replan(mb.bundle(ROW_SCHEDULE[key]), num), threads=args.threads)
                runner.activate()
            for g in range(groups):
                seeds = list(range(start + g * num, start + (g + 1) * num))
                if ROW_ENGINE[key] == "ort":
                    noise = noise_for_seeds(f, seeds).numpy()
                    images = torch.from_numpy(runner.infer(noise, {"class_labels": labels.numpy()}))
                else:
                    chunk = 1 if key == "cache-dit" else num
                    outs = []
                    for lo in range(0, num, chunk):
                        inp = setup.Inputs(min(chunk, num - lo), seeds[lo:lo + chunk], None, {}, None, labels[lo:lo + chunk].tolist())
                        outs.append(setup.call_pipeline(mb.pipeline(key), f, inp, mb.steps, mb.scale) * 2 - 1)  # [0,1] -> [-1,1]
                    images = torch.cat(outs)
                fd, acc = score(images)
                fds.append(fd)
                accs.append(acc)
            if runner is not None:
                runner.deactivate()
        out["rows"][key] = {"fd": fds, "accuracy": accs, "fd_mean": float(np.mean(fds)), "accuracy_mean": float(np.mean(accs)),
                            "seconds": time.perf_counter() - t0}
        log(f"  quality {key}: FD {np.mean(fds):.3f}, accuracy {np.mean(accs):.3f}")
    return out


# ========================================================================= peak memory
def memory_child(spec, key: str, mb: ModelBench, rstr_file: Path, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", key, "--models", spec.key, "--work", str(args.work),
           "--threads", str(args.threads), "--_rstr", str(rstr_file)]
    if args.quick:
        cmd.append("--quick")
    if args.reference is not None:
        cmd += ["--reference", str(args.reference)]
    if ROW_ENGINE[key] == "ort":
        cmd += ["--_bundle", str(mb.bundle_dir(ROW_SCHEDULE[key]))]
    log(f"  peak memory: {key} in a fresh process")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    log(f"  memory child for {key} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return None


def _status_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (VmRSS: now; VmHWM: peak of this process image)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_main(args) -> int:
    """Run one row once per batch in this fresh process; print its peak RSS (VmHWM)."""
    spec = MODELS[args.models[0]]
    key = args._child
    batches = [1] + ([spec.big_batch] if spec.big_batch else [])
    if ROW_ENGINE[key] == "ort":  # torch-free: what a deployment of the bundle holds
        from rstr.engines.bundle import Bundle
        from rstr.engines.onnxruntime import OnnxRuntimeRunner

        bundle = Bundle.open(args._bundle)
        imports = _status_mb()
        for b in batches:
            noise, cond, uncond = setup.bundle_inputs_np(bundle, b)
            with OnnxRuntimeRunner(setup.replan(bundle, b), threads=args.threads) as runner:
                runner.infer(noise, cond, uncond)
    else:
        import torch  # noqa: F401

        imports = _status_mb()
        mb = ModelBench(spec, args, None, rstr_file=args._rstr)
        fn = mb.torch_row(key, copy_transformer=False)  # cache-dit: on the one transformer, like a user would
        for b in batches:
            fn(b)
    # VmHWM, not ru_maxrss: Linux folds the parent's high-water mark into the child's ru_maxrss at exec.
    report = {"peak_rss_mb": _status_mb("VmHWM"), "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "after_imports_mb": imports, "torch_imported": "torch" in sys.modules}
    print(CHILD_TAG + json.dumps(report), flush=True)
    return 0


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
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gb": mem, "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "cache_dit": setup.cache_dit_version(), "platform": platform.platform()}


# ================================================================================= main
def parse(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: all; --quick: {', '.join(setup.QUICK_MODELS)})")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)} (default: all)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per measurement (default 5; --quick 1)")
    p.add_argument("--out", type=Path, default=setup.ROOT / "docs" / "benchmarks.md",
                   help="markdown report; plots and results.json go to bench/ beside it")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 rep, 10 steps for DiT-S and the text models, 40 quality images, no memory children, "
                        "no DiT-XL unless named")
    p.add_argument("--schedule", type=Path, default=None,
                   help="the reference model's rstr schedule (default: best under docs/search/)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch and ONNX Runtime intra-op threads (default: all)")
    p.add_argument("--reference", type=Path, default=None,
                   help="the reference model directory (default: rstr/reference/digits-dit)")
    p.add_argument("--work", type=Path, default=setup.ROOT / "build" / "bench", help="cache of model directories and bundles")
    p.add_argument("--rebuild", action="store_true", help="re-export bundles even when cached")
    p.add_argument("--update", action="store_true",
                   help="keep the other models' results from the existing bench/results.json beside --out (each model's rows "
                        "are always measured together in one run; the report dates each model)")
    p.add_argument("--quality-num", type=int, default=None, help="held-out images per seed group (default 500; --quick 40)")
    p.add_argument("--quality-groups", type=int, default=None, help="held-out seed groups (default 2; --quick 1)")
    p.add_argument("--no-quality", action="store_true", help="skip the reference model's FD/accuracy")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak RSS per row in a fresh process (default: on; off with --quick)")
    p.add_argument("--count-full-runs", action=argparse.BooleanOptionalAction, default=None,
                   help="count FLOPs over a whole batch-1 generation for PyTorch rows too (default: on; off with --quick); "
                        "cache-dit is always counted that way")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_bundle", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_rstr", type=Path, default=None, help=argparse.SUPPRESS)
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


def source_schedule(args):
    """The reference model's rstr schedule (searched, else hand-made), transferred to the other models."""
    from rstr.families import load_model

    try:
        ref = load_model(setup.reference_dir())
    except Exception as err:  # noqa: BLE001
        if args.schedule is not None:
            from rstr.schedule import GuidanceSchedule

            return GuidanceSchedule.load(args.schedule), str(args.schedule)
        raise SystemExit(f"bench: error: cannot load the reference model ({err}); train it with "
                         "`python tools/train_reference.py --out rstr/reference/digits-dit --seed 0`") from None
    s, where = setup.find_searched_schedule(ref, args.schedule)
    if s is None:
        s = setup.hand_schedule(ref, ref.default_steps, float(ref.meta.get("default_scale", 2.0)))
        where = "hand-made stand-in (no searched schedule under docs/search/): first third of 60% of the steps guided"
    return s, where


def _partial(results: dict, args, t0: float, write_report) -> None:
    snap = dict(results, matmul_end=results["matmul_start"], contention_end=results["contention"],
                peak_gflops=results["matmul_start"]["gflops"], seconds=time.time() - t0, partial=True)
    write_report(snap, args.out)


def main(argv=None) -> int:
    args = parse(argv)
    if args._child:
        return child_main(args)
    import torch

    torch.set_num_threads(args.threads)
    from bench_report import write_report

    t0 = time.time()
    sched, where = source_schedule(args)
    log(f"rstr schedule: {where}; {sched.describe()}")
    results = {"command": "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "threads": args.threads,
               "reps": args.reps, "quick": args.quick, "schedule_source": where, "source_schedule": sched.to_dict(),
               "schedule_describe": sched.describe(),
               "tensorrt": setup.tensorrt_unavailable() or "available", "models": {}}
    results["contention"] = contention_probe(args.threads)
    c = results["contention"]
    log(f"contention probe: {c['ratio']:.2f}x slower on {c['threads']} threads than on 1 (load average {c['loadavg'][0]:.1f})")
    if c["ratio"] > 2:
        log("  WARNING: other jobs are competing for the cores; multi-threaded timings will be inflated "
            "(rerun on an idle machine, or with --threads 1)")
    log("fp32 matmul peak ...")
    sizes = (1024, 2048) if args.quick else (1024, 2048, 4096)
    results["matmul_start"] = matmul_peak(args.threads, sizes)
    log(f"  {results['matmul_start']['gflops']:.1f} GFLOP/s")
    previous = {}
    old = args.out.parent / "bench" / "results.json"
    if args.update and old.is_file():
        previous = json.loads(old.read_text()).get("models", {})
        results["models"] = {k: v for k, v in previous.items() if k not in args.models}
        results["updated"] = sorted(results["models"])
    for key in args.models:
        try:
            results["models"][key] = bench_model(MODELS[key], args, sched)
            results["models"][key].update(threads=args.threads, reps=args.reps, schedule_source=where)
        except Exception as err:  # noqa: BLE001 - one model failing must not lose the others
            import traceback

            traceback.print_exc()
            results["models"][key] = {"key": key, "title": MODELS[key].title, "error": f"{type(err).__name__}: {err}"}
        _partial(results, args, t0, write_report)  # a report after every model: an interrupted run keeps what it measured
    results["matmul_end"] = matmul_peak(args.threads, sizes)
    results["contention_end"] = contention_probe(args.threads)
    # The peak: the best rate seen at any of this run's measurements (start, before each model, end).
    seen = [results["matmul_start"]["gflops"], results["matmul_end"]["gflops"]]
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
