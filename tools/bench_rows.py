"""One benchmarked model's rows as calls to measure, for ``tools/bench.py``.

:class:`ModelBench` loads the model, its two schedules (constant CFG and rstr) and inputs,
and turns each row (stock pipeline, cache-dit, rstr sampler, bundle on ONNX Runtime or
TensorRT) into a function of the batch; it also gives the single denoiser calls and the
held-out image generators that the measurements in ``bench_measure.py`` time and score.
Everything is built lazily, so that a memory child process builds only its own row.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import bench_measure as measure
import bench_pipelines as pipelines
import bench_setup as setup
import numpy as np
from bench_measure import log
from bench_setup import ROW_ENGINE, ROW_PRECISION, ROW_SCHEDULE, ROWS, is_cache_dit


def at_batch(bundle, batch: int):
    """``bundle`` walked at ``batch``: its graphs are batch-dynamic, only the plan's batches change (torch-free)."""
    return bundle.with_batch(batch)


# ============================================================================ one model
class ModelBench:
    """Rows of one model as calls to measure, built lazily (a memory child builds only its own row)."""

    def __init__(self, spec, args, source_schedules: dict, rstr_files: dict[str, Path] | None = None):
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
        self.schedules = {"cfg": self.cfg}
        for kind, source in source_schedules.items():  # rstr (50%), rstr30 (30%); absent where none was found
            if rstr_files is not None:
                self.schedules[kind] = GuidanceSchedule.load(rstr_files[kind])
            else:
                self.schedules[kind] = source if spec.key == "ref" else setup.transfer_schedule(source, f, steps)
        self.rstr = self.schedules["rstr"]
        self.batches = [1] + ([getattr(args, "big_batch", None) or spec.big_batch] if spec.big_batch else [])
        self.inputs = {b: setup.make_inputs(f, b) for b in self.batches}
        self.bundles: dict[tuple[str, str, str], Any] = {}  # (schedule kind, backend, precision) -> Bundle
        self.runners: dict[tuple[str, int], Any] = {}  # (row, batch) -> active runner
        self.clocks: dict[tuple[str, int], measure.SessionClock] = {}  # ONNX Runtime runners' session time
        self.pipes: dict[str, Any] = {}
        self.session_log: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        torch.set_num_threads(args.threads)

    def describe(self) -> dict:
        """What the report says about the model and its two schedules."""
        f, spec = self.family, self.spec
        return {
            "key": spec.key,
            "title": spec.title,
            "shape": spec.shape,
            "family": f.name,
            "steps": self.steps,
            "scale": self.scale,
            "batches": self.batches,
            "parameters": sum(p.numel() for p in f.transformer.parameters()),
            "blocks": len(f.blocks()),
            "schedules": {
                k: {
                    "describe": s.describe(),
                    "passes": s.passes_per_image,
                    "compute_fraction": s.compute_fraction,
                    "schedule": s.to_dict(),
                }
                for k, s in self.schedules.items()
            },
        }

    # ------------------------------------------------------------------ reasons to skip
    def skip_reason(self, key: str) -> str | None:
        base = key.split("@")[0]
        if key in self.spec.skip or base in self.spec.skip:
            return self.spec.skip.get(key, self.spec.skip.get(base))
        if ROW_SCHEDULE[key] not in self.schedules:
            return f"no searched schedule within {setup.SCHEDULE_BUDGETS[ROW_SCHEDULE[key]]:.0%} under docs/search/"
        if is_cache_dit(key):
            return pipelines.cache_dit_unavailable(self.family)
        if ROW_ENGINE[key] == "trt":
            return pipelines.tensorrt_unavailable()
        if ROW_ENGINE[key] == "ort" and ROW_PRECISION[key] == "bf16":
            return setup.CPU_BF16
        return None

    def set_up_rows(self, selected: list[str]) -> tuple[dict[str, Callable[[int], Any]], dict[str, str]]:
        """Each row that runs, as a function of the batch; why each other row does not."""
        runs, skipped = {}, {}
        for key in ROWS:
            why = self.skip_reason(key) or (None if key in selected else "not selected (--rows)")
            if why is None:
                try:
                    runs[key] = self.row(key)
                except Exception as err:  # noqa: BLE001 - a row that cannot be set up is reported, not fatal
                    why = f"setup failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    log(f"  {key}: {why}")
            if why is not None:
                skipped[key] = why
        return runs, skipped

    # ------------------------------------------------------------------------ torch rows
    def pipeline(self, key: str, copy_transformer: bool = True):
        if key not in self.pipes:
            if key == "diffusers":
                self.pipes[key] = pipelines.stock_pipeline(self.family, self.family.transformer)
            elif key == "diffusers-compile":
                self.pipes[key] = pipelines.compiled_pipeline(self.family, copy_transformer=copy_transformer)
            else:
                threshold = float(key.split("@")[1])
                self.pipes[key] = pipelines.cache_dit_pipeline(
                    self.family, self.steps, threshold, copy_transformer=copy_transformer
                )
        return self.pipes[key]

    def torch_row(self, key: str, copy_transformer: bool = True) -> Callable[[int], Any]:
        from rstr.sampler import sample

        f = self.family
        if key != "rstr-torch":
            pipe = self.pipeline(key, copy_transformer)
            return lambda b: pipelines.call_pipeline(pipe, f, self.inputs[b], self.steps, self.scale)
        return lambda b: sample(f, self.rstr, self.inputs[b].cond, uncond=self.inputs[b].uncond, noise=self.inputs[b].noise)

    # -------------------------------------------------------------------------- bundles
    def bundle_dir(self, kind: str, backend: str = "onnxruntime", precision: str = "fp32") -> Path:
        tag = (
            self.dir.name
            if self.spec.config is not None
            else setup.file_digest(self.dir / "transformer" / "diffusion_pytorch_model.safetensors")
        )
        digest = setup._digest([tag, self.schedules[kind].to_dict(), backend, precision])
        return self.args.work / "bundles" / f"{self.spec.key}-{kind}-{backend}-{precision}-{digest}"

    def bundle(self, kind: str, backend: str = "onnxruntime", precision: str = "fp32"):
        if (kind, backend, precision) not in self.bundles:
            self.bundles[kind, backend, precision] = pipelines.build_bundle(
                self.dir,
                self.schedules[kind],
                self.bundle_dir(kind, backend, precision),
                log,
                backend=backend,
                rebuild=self.args.rebuild,
                precision=precision,
            )
        return self.bundles[kind, backend, precision]

    def row_bundle(self, key: str):
        """The bundle that bundle row ``key`` walks."""
        return self.bundle(ROW_SCHEDULE[key], "tensorrt" if ROW_ENGINE[key] == "trt" else "onnxruntime", ROW_PRECISION[key])

    def new_runner(self, key: str, batch: int):
        """A fresh, inactive runner of bundle row ``key`` at ``batch``."""
        if ROW_ENGINE[key] == "ort":
            from rstr.engines.onnxruntime import OnnxRuntimeRunner

            return OnnxRuntimeRunner(at_batch(self.row_bundle(key), batch), threads=self.args.threads)
        from rstr.engines.tensorrt import TensorRTRunner

        return TensorRTRunner(at_batch(self.row_bundle(key), batch))

    def runner(self, key: str, batch: int):
        """The active runner that row ``key`` times at ``batch`` (ONNX Runtime ones with their sessions clocked)."""
        if (key, batch) not in self.runners:
            r = self.new_runner(key, batch)
            r.activate()
            if ROW_ENGINE[key] == "ort":
                self.clocks[key, batch] = measure.instrument(r)
            self.runners[key, batch] = r
        return self.runners[key, batch]

    def bundle_row(self, key: str) -> Callable[[int], Any]:
        """A bundle row; ONNX Runtime calls also log ``(infer, denoiser, step graphs)`` seconds for the overhead split."""
        self.row_bundle(key)  # export now: a failing export is reported as this row's reason

        def run(b: int):
            inp, r = self.inputs[b], self.runner(key, b)
            clock = self.clocks.get((key, b))
            if clock is None:
                return r.infer(inp.noise_np, inp.np("cond"), inp.np("uncond"))
            clock.reset()
            t0 = time.perf_counter()
            out = r.infer(inp.noise_np, inp.np("cond"), inp.np("uncond"))
            self.session_log.setdefault((key, b), []).append((time.perf_counter() - t0, clock.denoiser, clock.steps))
            return out

        return run

    def row(self, key: str) -> Callable[[int], Any]:
        return self.torch_row(key) if ROW_ENGINE[key] == "torch" else self.bundle_row(key)

    def check_bundles(self) -> dict[str, float]:
        """Max relative error against the PyTorch sampler (same noise) of every ONNX Runtime bundle walk used.

        Keyed ``<schedule>-<precision>@<batch>``: batch 1 as verified by the build (bf16 emulated
        on CPU), larger batches verified here the same way.
        """
        from rstr.export.plan import build_plan
        from rstr.export.verify import verify

        out = {}
        for (kind, backend, precision), bundle in self.bundles.items():
            if backend != "onnxruntime":
                continue
            out[f"{kind}-{precision}@1"] = bundle.manifest.verification.max_rel_error
            for b in self.batches[1:]:
                re = at_batch(bundle, b)
                if re.plan != build_plan(self.family, self.schedules[kind], b):
                    raise RuntimeError(f"replanned {kind} bundle at batch {b} differs from build_plan")
                out[f"{kind}-{precision}@{b}"] = verify(
                    re, self.family, self.schedules[kind], raise_on_failure=False
                ).max_rel_error
        return out

    def bundle_files_mb(self) -> dict[str, float]:
        return {
            f"{kind}-{precision}": sum(e.bytes or 0 for e in b.manifest.files.values()) / 2**20
            for (kind, backend, precision), b in self.bundles.items()
            if backend == "onnxruntime"
        }

    def precision_gates(self) -> dict[str, dict]:
        """Each reduced-precision bundle's build record (rstr.export.precision_gate): what it cost where measured."""
        out = {}
        for (kind, backend, precision), b in self.bundles.items():
            gate = ((b.manifest.summary or {}).get("gates") or {}).get("precision")
            if precision != "fp32" and gate:
                out[f"{backend}-{kind}-{precision}"] = {k: gate.get(k) for k in ("decision", "conversion", "speed", "verdict")}
        return out

    # ------------------------------------------------------------------- denoiser calls
    def denoiser_input(self, b: int, n: int):
        """Noise, timestep and conditioning of one transformer call at ``n`` rows (``b``: unguided, ``2b``: guided)."""
        import torch

        from rstr.families.base import expand_timestep
        from rstr.sampler import pair

        f, inp = self.family, self.inputs[b]
        cond = inp.cond
        if n == 2 * b:
            cond = pair(inp.cond, inp.uncond if inp.uncond is not None else f.unconditional(inp.cond))
        x = torch.cat([inp.noise] * (n // b))
        t = expand_timestep(f.model_timestep(f.fresh_scheduler().config.num_train_timesteps // 2), n, x.device)
        return x, t, cond

    def denoiser_calls(self, runs: dict) -> dict[str, Callable[[], Any]]:
        """One transformer call per engine in ``runs`` (PyTorch eager, ONNX Runtime session) at B and 2B rows."""
        engines = {ROW_ENGINE[k] for k in runs}
        calls = {}
        for b in self.batches:
            for n in (b, 2 * b):
                x, t, cond = self.denoiser_input(b, n)
                if "torch" in engines:
                    calls[f"torch@{n}"] = partial(_torch_call, self.family, x, t, cond)
                for key in ("ort-rstr", "ort-rstr-int8-dynamic", "ort-rstr-int8"):  # the denoiser at each precision
                    if key in runs:
                        calls[f"{key.replace('-rstr', '')}@{n}"] = _ort_call(self.runner(key, b), x, t, cond)
                if "ort" in engines and "ort@" + str(n) not in calls and "ort-cfg" in runs:
                    calls[f"ort@{n}"] = _ort_call(self.runner("ort-cfg", b), x, t, cond)
        return calls

    # -------------------------------------------------------------------------- quality
    @contextlib.contextmanager
    def held_out_images(self, key: str, labels) -> Iterator[Callable[[list[int]], Any]]:
        """Row ``key`` as a function from seeds to images in [-1, 1], image i from seed i's own noise and ``labels[i]``.

        cache-dit runs one image per call (its cache decisions look at the whole batch, and batch
        1 is the latency setting timed); bundle rows use a runner of their own at ``len(labels)``.
        """
        import torch

        from rstr.evaluate import noise_for_seeds

        f, num = self.family, len(labels)
        if ROW_ENGINE[key] != "torch":
            with self.new_runner(key, num) as runner:
                yield lambda seeds: torch.from_numpy(
                    runner.infer(noise_for_seeds(f, seeds).numpy(), {"class_labels": labels.numpy()})
                )
            return
        chunk = 1 if is_cache_dit(key) else num

        def generate(seeds: list[int]):
            outs = []
            for lo in range(0, num, chunk):
                inp = setup.Inputs(min(chunk, num - lo), seeds[lo : lo + chunk], None, {}, None, labels[lo : lo + chunk].tolist())
                outs.append(
                    pipelines.call_pipeline(self.pipeline(key), f, inp, self.steps, self.scale) * 2 - 1  # [0,1] -> [-1,1]
                )
            return torch.cat(outs)

        yield generate

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()
        self.runners.clear()
        self.clocks.clear()
        self.pipes.clear()


def _torch_call(family, x, t, cond):
    import torch

    with torch.no_grad():
        return family.denoise(x, t, cond)


def _ort_call(runner, x, t, cond) -> Callable[[], Any]:
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
