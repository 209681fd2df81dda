"""``rstr-export build``: Stage-1, Stage-2, merge, export, verify, report -- one bundle.

:func:`build` calls the steps in order: the stages and their gates (:mod:`rstr.export.stages`;
a stage is skipped when its result is given, ``schedule`` or ``adapter``), the merge, the plan
(:mod:`rstr.export.plan`), the graphs (:mod:`rstr.export.graphs`), verification against PyTorch
(:mod:`rstr.export.verify`), engines, the measurements against the stock model
(:mod:`rstr.export.measure`) and the report.  The bundle is assembled in a temporary directory
and renamed onto ``out`` only when verified and complete.
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.markup import escape
from rstr.engines.bundle import Bundle
from rstr.engines.endpoints import Classes, Decoder, Text
from rstr.engines.manifest import Conditioning, Engine, Graph, Manifest, Provenance, TensorDesc, VerificationRecord
from rstr.export.bundle import versions, write_manifest
from rstr.export.classes import GRAPH as CLASS_GRAPH
from rstr.export.classes import class_graph, classes_section, export_class_table, has_class_table
from rstr.export.decoder import GRAPH as DECODER_GRAPH
from rstr.export.decoder import decoder_graph, decoder_section, export_vae_decoder
from rstr.export.graphs import export_denoiser, export_steps, graph_description
from rstr.export.measure import REPORT_GROUPS, REPORT_NUM, measure_quality, measure_speed
from rstr.export.plan import build_plan
from rstr.export.precision import check_precision
from rstr.export.precision_gate import candidate_for, choose_precision
from rstr.export.stages import gate_schedule, run_stage1, run_stage2
from rstr.export.text import export_text_encoders, text_graphs, text_section
from rstr.export.verify import Verification, check_bundle, reference_run, rel

from rstr._io import atomic_dir
from rstr.errors import BackendUnavailable, BundleError, RstrError
from rstr.families import load_model, model_sha256
from rstr.families.base import Family
from rstr.families.weights import weight_bytes
from rstr.schedule import GuidanceSchedule

MERGE_TOLERANCE = 1e-5
# Past this many bytes of weights a model is large: its PyTorch weights are freed before ONNX Runtime loads the
# graphs, and its speed is not timed by the build (that runs PyTorch and the bundle side by side, holding both).
LARGE_MODEL_BYTES = 1 << 30
log = logging.getLogger("rstr")


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
    require_better: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | int8 | int8-dynamic (rstr.export.precision)
    prompts: Path | None = None
    device: str = "cpu"  # where the PyTorch stages and the quality measurement run
    height: int | None = None  # output size and prompt tokens; None: the model's (rstr.families.size)
    width: int | None = None
    max_text_len: int | None = None
    teacher: Path | None = None  # Stage-2's teacher schedule (default: constant CFG at full steps)

    @property
    def size(self) -> dict[str, int]:
        """The size options given, as the manifest records them (``provenance.size``)."""
        given = {"height": self.height, "width": self.width, "max_text_len": self.max_text_len}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    verification: Verification
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- steps
def merge_adapter(family: Family, adapter: Path, batch: int) -> str:
    """Merge the LoRA into the block weights; check merged == adapter model to 1e-5 first."""
    from rstr.calibrate import adapter_sha256, load_adapter

    peft_model = load_adapter(family, adapter)
    cond, _ = family.example_conditioning(2 * batch, seed=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(family.sample_shape(2 * batch), generator=g)
    t = torch.full(
        (2 * batch,), family.model_timestep(family.fresh_scheduler().config.num_train_timesteps // 2), dtype=torch.float32
    )
    c = family.check_conditioning(cond, 2 * batch)
    with torch.no_grad():
        family.transformer = peft_model
        with_adapter = family.predict(x, t, c).numpy()
        family.transformer = peft_model.merge_and_unload().eval()
        merged = family.predict(x, t, c).numpy()
    err = rel(merged, with_adapter)
    if err > MERGE_TOLERANCE:
        raise RuntimeError(f"merged LoRA differs from the adapter model by {err:.1e} (> {MERGE_TOLERANCE:.0e})")
    return adapter_sha256(adapter)


def check_runs_in_dtype(family: Family, dtype: str) -> None:
    """One transformer call at batch 1 in a reduced dtype, before any work: a dtype the model cannot run in is one line."""
    if dtype == "fp32":
        return
    cond, _ = family.example_conditioning(1)
    x = torch.randn(family.sample_shape(1), generator=torch.Generator().manual_seed(0)).to(family.device)
    t = torch.full((1,), family.model_timestep(family.fresh_scheduler().config.num_train_timesteps // 2), device=family.device)
    try:
        with torch.no_grad():
            out = family.predict(x, t, family.check_conditioning(cond, 1))
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RstrError(
            f"--dtype {dtype}: the {family.name} model cannot run in {dtype} here ({first}); use --dtype fp32"
        ) from None
    if not torch.isfinite(out).all():
        raise RstrError(
            f"--dtype {dtype}: the {family.name} model gives non-finite outputs in {dtype} (overflow); use --dtype fp32"
        )


def check_dtype_runs(dtype: str, check: Callable[[], Verification]) -> Verification:
    """Run ``check``; a graph ONNX Runtime cannot load is named with the dtype that made it."""
    try:
        return check()
    except BundleError as err:
        raise RstrError(f"--dtype {dtype}: {err}; use --dtype fp32 or fp16") from None


def move_weights(family: Family, device: str) -> None:
    """The transformer, VAE and text encoders to ``device``; ``meta`` frees the weights once only ONNX Runtime runs."""
    for module in (family.transformer, family.vae, *(e.model for e in family.text_encoders)):
        if module is not None:
            module.to(device)
    if device == "meta":  # the exporter's programs hold the weights in reference cycles: collect them now
        gc.collect()


def torch_runs_after_verification(family: Family, opts: BuildOptions) -> bool:
    """Whether the precision gate or the quality measurement still runs the PyTorch model after verification."""
    return family.quality == "digits" or (opts.dtype == "fp32" and opts.precision not in ("auto", "fp32"))


def build_engines_if_usable(root: Path, manifest: Manifest, opts: BuildOptions) -> list[Engine]:
    """TensorRT engines when asked for (or ``auto`` and usable); ``[]`` means ONNX Runtime only."""
    if opts.backend == "onnxruntime":
        return []
    from rstr.engines.tensorrt import build_engines

    try:
        return build_engines(root, manifest)
    except BackendUnavailable as why:
        if opts.backend == "tensorrt":
            raise
        log.info(f"TensorRT not used: {escape(str(why))}; the bundle runs on ONNX Runtime")
        return []


def tensorrt_targeted(backend: str) -> bool:
    """Whether the build makes TensorRT engines: asked for, or ``auto`` with TensorRT and a GPU here."""
    if backend != "auto":
        return backend == "tensorrt"
    from rstr.engines.tensorrt.cuda import gpu, load_tensorrt

    try:
        load_tensorrt()
        gpu(0)
    except BackendUnavailable:
        return False
    return True


# ------------------------------------------------------------------------------- build
def build(opts: BuildOptions) -> BuildResult:
    """The whole job: stages as needed (with their gates), merge, export, verify, engines, report, manifest."""
    if opts.out.exists() and not opts.force:
        raise RstrError(f"output directory {opts.out} exists; pass --force to replace it or choose another --out")
    if opts.batch < 1:
        raise RstrError(f"--batch {opts.batch} must be at least 1")
    family = load_model(
        opts.model,
        device=opts.device,
        dtype=opts.dtype,
        prompts=opts.prompts,
        height=opts.height,
        width=opts.width,
        max_text_len=opts.max_text_len,
    )
    check_runs_in_dtype(family, opts.dtype)
    if opts.schedule is not None:
        build_plan(family, GuidanceSchedule.load(opts.schedule), opts.batch)  # refuse a misfit before any work
    teacher = None
    if opts.teacher is not None:
        if opts.schedule is not None or opts.adapter is not None:
            raise RstrError("--teacher is Stage-2's, which --schedule and --adapter skip; drop --teacher or both of them")
        teacher = GuidanceSchedule.load(opts.teacher)
        teacher.check_fits(family.name, family.sampler)
    if opts.require_better and family.quality != "digits":
        raise RstrError("--require-better needs a model with a quality measure here (a digits classifier); drop it")
    if opts.precision != "auto":
        check_precision(opts.precision)
    if opts.precision not in ("auto", "fp32") and opts.dtype != "fp32":
        raise RstrError(
            f"--precision {opts.precision} converts an fp32 export; drop --dtype {opts.dtype} (or use --precision fp32)"
        )

    with atomic_dir(opts.out, force=opts.force) as root:
        stages = root / "stages"
        stages.mkdir()
        gates: dict[str, dict] = {}
        if opts.schedule is None:
            schedule, gate = gate_schedule(family, run_stage1(family, opts.preset, opts.budget, opts.seed, stages))
            gates["schedule"] = gate.to_json()
        else:
            schedule = GuidanceSchedule.load(opts.schedule)
            gate = None
        adapter = opts.adapter
        if adapter is None and opts.schedule is None:
            adapter, adapter_gate = run_stage2(family, schedule, gate, opts.preset, opts.seed, stages, teacher)
            gates["adapter"] = adapter_gate.to_json()
            log.info(adapter_gate.decision)
        schedule.save(root / "schedule.json")
        move_weights(family, "cpu")  # merge, export and verification against the CPU runtime run on the CPU

        adapter_hash = None
        if adapter is not None:
            log.info(f"merging adapter {adapter}")
            adapter_hash = merge_adapter(family, adapter, opts.batch)
            if not (stages / "adapter").exists():
                shutil.copytree(adapter, stages / "adapter")

        plan = build_plan(family, schedule, opts.batch)
        log.info(f"exporting {family.name} ({opts.dtype}, batch {opts.batch}) to ONNX")
        export_denoiser(family, root / "denoiser.onnx", dtype=opts.dtype, batch=opts.batch)
        export_steps(family, root, batch=opts.batch, history=plan.history)
        graphs = graph_description(family, opts.batch, plan.history)
        if family.vae is not None:
            log.info(f"exporting the VAE decoder ({opts.dtype})")
            export_vae_decoder(family, root / f"{DECODER_GRAPH}.onnx")
            graphs[DECODER_GRAPH] = decoder_graph(family)
        if family.text_encoders:
            log.info(f"exporting the text encoders ({opts.dtype}) and their tokenizers")
            export_text_encoders(family, root)
            graphs.update(text_graphs(family))
        text = text_section(family)
        if has_class_table(family):
            log.info("exporting the class table (class labels in)")
            export_class_table(family, root / f"{CLASS_GRAPH}.onnx")
            graphs[CLASS_GRAPH] = class_graph(family)

        decoder = decoder_section(family)
        manifest = Manifest(
            family=family.name,
            dtype=opts.dtype,
            sample=TensorDesc("sample", "float32", tuple(family.sample_shape(opts.batch))),
            graphs={name: Graph.from_json(g) for name, g in graphs.items()},
            conditioning=Conditioning.from_json(conditioning_section(family)),
            plan=plan,
            decoder=None if decoder is None else Decoder.from_json(decoder),
            text=None if text is None else Text.from_json(text),
            classes=Classes.from_json(classes_section(family)) if has_class_table(family) else None,
            provenance=Provenance(
                model=str(family.path),
                model_sha256=None if family.path is None else model_sha256(family.path),
                size=opts.size,
                schedule_sha256=schedule.sha256(),
                adapter="stages/adapter" if adapter is not None else None,
                adapter_sha256=adapter_hash,
                versions=versions(),
            ),
        )
        write_manifest(root, manifest)  # provisional, so the bundle can be opened and verified
        log.info("verifying the bundle against PyTorch (ONNX Runtime, CPU): the PyTorch side first")
        bundle = Bundle.open(root)
        reference = reference_run(family, schedule, opts.batch)
        large = weight_bytes(family.transformer) > LARGE_MODEL_BYTES
        if large and not torch_runs_after_verification(family, opts):
            move_weights(family, "meta")  # free the PyTorch weights before ONNX Runtime loads the graphs
        check = check_dtype_runs(opts.dtype, lambda: check_bundle(bundle, reference))
        if opts.dtype == "fp32":
            candidate = candidate_for(opts.backend, tensorrt_targeted(opts.backend))
            record = choose_precision(family, schedule, bundle, opts.precision, candidate, stages, opts.measure)
            gates["precision"] = record.to_json()
            if record.shipped != "fp32":
                manifest = write_manifest(root, replace(manifest, precision=record.shipped))
                bundle = Bundle.open(root)
                check = check_bundle(bundle, reference)
        summary: dict = {
            "schedule": schedule.describe(),
            "compute_fraction": schedule.compute_fraction,
            "compute_saved": 1 - schedule.compute_fraction,
            "max_rel_error": check.max_rel_error,
            "precision": manifest.precision,
            "gates": gates,
        }
        if opts.measure or opts.require_better:
            quality = None
            if family.quality == "digits":  # else no quality measure here, and a large model's weights are freed
                log.info(f"measuring quality against the stock model ({REPORT_GROUPS} x {REPORT_NUM} held-out seeds, paired)")
                family.transformer.to(opts.device)
                quality = measure_quality(family, schedule, bundle if manifest.precision != "fp32" else None)
                family.transformer.to("cpu")  # the speed measurement compares PyTorch and ONNX Runtime on the CPU
            summary["quality"] = None if quality is None else quality.to_json()
            if opts.require_better and (quality is None or quality.verdict != "better"):
                raise RstrError(
                    f"--require-better: the bundle does not beat the stock model on every held-out group "
                    f"({quality.describe() if quality else 'no quality measure'})"
                )
        if large:
            if opts.measure:
                summary["speed"] = None
                log.info(
                    f"speed not measured: the model's weights pass {LARGE_MODEL_BYTES >> 20} MiB and timing would hold them "
                    f"twice (PyTorch and the bundle side by side); time it with tools/bench.py"
                )
            move_weights(family, "meta")  # from here on only ONNX Runtime runs
        manifest = replace(manifest, verification=VerificationRecord.from_json(check.to_json()))
        manifest = replace(manifest, engines=tuple(build_engines_if_usable(root, manifest, opts)))
        if opts.measure and not large:
            log.info("measuring speed (end to end, interleaved, median of 5)")
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
    section: dict = {
        "inputs": inputs,
        "unconditional": {s["name"]: {"fill": fill[s["name"]]} if fill else "required" for s in inputs},
    }
    if family.conditioning == "class-labels" and family.num_classes is not None:
        section["num_classes"] = family.num_classes
    return section
