"""``rstr-export build``: Stage-1, Stage-2, merge, export, verify, report -- one bundle.

Each step is a function below, called in order by :func:`build`; a step is skipped when its
result is given (``schedule``, ``adapter``).  The bundle is assembled in a temporary
directory and renamed onto ``out`` only when verified and complete.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from rstr._io import atomic_dir
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import Conditioning, Decoder, Engine, Graph, Manifest, Provenance, TensorDesc, VerificationRecord
from rstr.errors import BackendUnavailable, RstrError
from rstr.export.bundle import versions, write_manifest
from rstr.export.graphs import export_denoiser, export_steps, graph_description
from rstr.export.plan import build_plan
from rstr.export.verify import Verification, example_inputs, rel, verify
from rstr.families import load_model
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule

MERGE_TOLERANCE = 1e-5


@dataclass
class BuildOptions:
    model: Path | None = None
    schedule: Path | None = None
    adapter: Path | None = None
    out: Path = Path("rstr-bundle")
    backend: str = "auto"
    dtype: str = "fp32"
    batch: int = 1
    force: bool = False
    preset: str = "fast"
    budget: float = 0.5
    seed: int = 0
    measure: bool = True


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    verification: Verification
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- stages
def run_stage1(family: Family, opts: BuildOptions, workdir: Path, console: Console) -> Path:
    """Stage-1 search (fast preset by default); returns the schedule file (reports beside it)."""
    import tempfile

    from rstr.search import preset_config, run_search, write_outputs

    config = preset_config(opts.preset, budget=opts.budget, steps=family.default_steps, seed=opts.seed)
    out = workdir / "schedule.json"
    console.print(f"[bold]Stage-1[/bold] searching a guidance schedule ({opts.preset} preset, budget {opts.budget:.0%})")
    with tempfile.TemporaryDirectory(prefix="rstr-search-") as checkpoints:
        write_outputs(run_search(family, config, checkpoints, out=out, progress=True), out)
    return out


def run_stage2(family: Family, schedule: GuidanceSchedule, opts: BuildOptions, workdir: Path, console: Console) -> tuple[Path | None, dict]:
    """Stage-2 calibration (fast preset by default); the adapter directory, or None when it would cost quality.

    The adapter is kept only if :func:`rstr.calibrate.quality_check` finds that it improves the
    model's quality measure under the schedule (models without one: always kept).
    """
    from rstr.calibrate import calibrate, describe_check, quality_check

    out = workdir / "adapter"
    console.print(f"[bold]Stage-2[/bold] calibrating LoRA against the constant-CFG teacher ({opts.preset} preset)")
    calibrate(family, schedule, out, preset=opts.preset, seed=opts.seed, progress=True)
    check = quality_check(family, schedule, out)
    if check is None:
        return out, {"used": True}
    if check["improves"]:
        console.print(f"Stage-2 adapter used: {describe_check(check)}")
        return out, {"used": True, "check": check}
    console.print(f"[yellow]Stage-2 adapter not used[/yellow]: {describe_check(check)}; matching the constant-CFG "
                  "teacher made the samples worse (stages/adapter keeps it for inspection)")
    return None, {"used": False, "check": check}


def merge_adapter(family: Family, adapter: Path, batch: int) -> str:
    """Merge the LoRA into the block weights; check merged == adapter model to 1e-5 first."""
    from rstr.calibrate import adapter_sha256, load_adapter

    peft_model = load_adapter(family, adapter)
    cond, _ = family.example_conditioning(2 * batch, seed=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(family.sample_shape(2 * batch), generator=g)
    t = torch.full((2 * batch,), family.model_timestep(family.fresh_scheduler().config.num_train_timesteps // 2), dtype=torch.float32)
    c = family.check_conditioning(cond, 2 * batch)
    with torch.no_grad():
        family.transformer = peft_model
        with_adapter = family.denoise(x, t, c).numpy()
        family.transformer = peft_model.merge_and_unload().eval()
        merged = family.denoise(x, t, c).numpy()
    err = rel(merged, with_adapter)
    if err > MERGE_TOLERANCE:
        raise RuntimeError(f"merged LoRA differs from the adapter model by {err:.1e} (> {MERGE_TOLERANCE:.0e})")
    return adapter_sha256(adapter)


def build_engines_if_usable(root: Path, manifest: Manifest, opts: BuildOptions, console: Console) -> list[Engine]:
    """TensorRT engines when asked for (or ``auto`` and usable); ``[]`` means ONNX Runtime only."""
    if opts.backend == "onnxruntime":
        return []
    from rstr.engines.tensorrt import build_engines

    try:
        return build_engines(root, manifest)
    except BackendUnavailable as why:
        if opts.backend == "tensorrt":
            raise
        console.print(f"[yellow]TensorRT not used:[/yellow] {why}; the bundle runs on ONNX Runtime")
        return []


# ---------------------------------------------------------------------------- measures
def measure_speed(family: Family, bundle: Bundle, schedule: GuidanceSchedule, reps: int = 5) -> dict:
    """Median end-to-end seconds, interleaved: PyTorch eager constant CFG vs the bundle (ORT)."""
    from rstr.engines.onnxruntime import OnnxRuntimeRunner
    from rstr.sampler import sample

    b = bundle.batch
    cond, uncond = example_inputs(family, b)
    noise = np.random.default_rng(0).standard_normal(bundle.sample.concrete(b), dtype=np.float32)
    tcond = {k: torch.from_numpy(v) for k, v in cond.items()}
    tuncond = None if uncond is None else {k: torch.from_numpy(v) for k, v in uncond.items()}
    baseline = family.constant_cfg(steps=schedule.default_steps, default_steps=schedule.default_steps)
    times: dict[str, list[float]] = {"pytorch_constant_cfg": [], "bundle": []}
    with OnnxRuntimeRunner(bundle) as runner:
        runner.infer(noise, cond, uncond)  # warm-up
        sample(family, baseline, tcond, uncond=tuncond, noise=torch.from_numpy(noise))
        for _ in range(reps):
            t0 = time.perf_counter()
            sample(family, baseline, tcond, uncond=tuncond, noise=torch.from_numpy(noise))
            times["pytorch_constant_cfg"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runner.infer(noise, cond, uncond)
            times["bundle"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"baseline": baseline.describe(), "seconds": med, "speedup": med["pytorch_constant_cfg"] / med["bundle"], "reps": reps}


def measure_quality(family: Family, schedule: GuidanceSchedule) -> dict | None:
    """Held-out FD and accuracy of the bundle's schedule and of constant CFG (models judged by the digits metrics)."""
    if family.quality != "digits":
        return None
    from rstr.evaluate import evaluate
    from rstr.seeds import HELD_OUT_SEEDS

    baseline = family.constant_cfg(steps=schedule.default_steps, default_steps=schedule.default_steps)
    kw = dict(num=250, groups=2, seed_start=HELD_OUT_SEEDS.start, progress=False)
    ours, base = evaluate(family, schedule, **kw), evaluate(family, baseline, **kw)
    return {"rstr": ours.to_dict(), "constant_cfg": base.to_dict(), "seeds": "held-out", "images_per_group": 250}


# ------------------------------------------------------------------------------- build
def build(opts: BuildOptions, console: Console | None = None) -> BuildResult:
    """The whole job: stages as needed, merge, export, verify, engines, report, manifest."""
    console = console or Console(stderr=True)
    if opts.out.exists() and not opts.force:
        raise RstrError(f"output directory {opts.out} exists; pass --force to replace it or choose another --out")
    if opts.batch < 1:
        raise RstrError(f"--batch {opts.batch} must be at least 1")
    family = load_model(opts.model)
    if opts.schedule is not None:
        build_plan(family, GuidanceSchedule.load(opts.schedule), opts.batch)  # refuse a misfit before any work

    with atomic_dir(opts.out, force=opts.force) as root:
        stages = root / "stages"
        stages.mkdir()
        schedule_path = opts.schedule or run_stage1(family, opts, stages, console)
        schedule = GuidanceSchedule.load(schedule_path)
        schedule.check_fits(family.name, family.sampler)
        stage2 = None
        if opts.adapter is None and opts.schedule is None:
            adapter, stage2 = run_stage2(family, schedule, opts, stages, console)
        else:
            adapter = opts.adapter
        schedule.save(root / "schedule.json")

        adapter_hash = None
        if adapter is not None:
            console.print(f"merging adapter {adapter}")
            adapter_hash = merge_adapter(family, adapter, opts.batch)
            if not (stages / "adapter").exists():
                shutil.copytree(adapter, stages / "adapter")

        plan = build_plan(family, schedule, opts.batch)
        console.print(f"exporting {family.name} ({opts.dtype}, batch {opts.batch}) to ONNX")
        export_denoiser(family, root / "denoiser.onnx", dtype=opts.dtype, batch=opts.batch)
        export_steps(family, root, batch=opts.batch)

        decoder = decoder_section(family)
        manifest = Manifest(
            family=family.name,
            dtype=opts.dtype,
            sample=TensorDesc("sample", "float32", tuple(family.sample_shape(opts.batch))),
            graphs={name: Graph.from_json(g) for name, g in graph_description(family, opts.batch).items()},
            conditioning=Conditioning.from_json(conditioning_section(family)),
            plan=plan,
            decoder=None if decoder is None else Decoder.from_json(decoder),
            provenance=Provenance(model=str(family.path), schedule_sha256=schedule.sha256(),
                                  adapter="stages/adapter" if adapter is not None else None, adapter_sha256=adapter_hash,
                                  versions=versions()),
        )
        write_manifest(root, manifest)  # provisional, so the bundle can be opened and verified
        console.print("verifying the bundle against PyTorch (ONNX Runtime, CPU)")
        bundle = Bundle.open(root)
        check = verify(bundle, family, schedule)
        manifest = replace(manifest, verification=VerificationRecord.from_json(check.to_json()))
        manifest = replace(manifest, engines=tuple(build_engines_if_usable(root, manifest, opts, console)))

        summary = {"schedule": schedule.describe(), "compute_saved": 1 - schedule.compute_fraction,
                   "max_rel_error": check.max_rel_error}
        if stage2 is not None:
            summary["stage2"] = stage2
        if opts.measure:
            console.print("measuring quality (held-out seeds) and speed (interleaved, median of 5)")
            summary["quality"] = measure_quality(family, schedule)
            summary["speed"] = measure_speed(family, bundle, schedule)
        manifest = replace(manifest, summary=summary)
        from rstr.export.report import write_report

        write_report(root, manifest.to_json(), family, schedule)
        manifest = write_manifest(root, manifest)
    return BuildResult(opts.out, manifest, check, summary)


def conditioning_section(family: Family) -> dict:
    """The manifest's ``conditioning``: inputs, how each becomes unconditional, and the class count."""
    inputs = [s.to_json() for s in family.cond_specs()]
    fill = family.null_fill()
    section: dict = {"inputs": inputs, "unconditional": {s["name"]: {"fill": fill[s["name"]]} if fill else "required" for s in inputs}}
    if family.conditioning == "class-labels" and family.num_classes is not None:
        section["num_classes"] = family.num_classes
    return section


def decoder_section(family: Family) -> dict | None:
    image = family.image
    return None if image is None else {"kind": "pixels", **image.to_json()}
