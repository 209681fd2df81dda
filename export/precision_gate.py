"""The precision gate: which precision a bundle's denoiser ships in, decided like the schedule and adapter gates.

``--precision auto`` (the default) tries the reduced precision the target backend runs fastest
(:func:`candidate_for`: ``int8-dynamic`` on ONNX Runtime CPU, ``bf16`` where TensorRT engines are
built) and keeps it only if

* **quality**: the reduced bundle's FD, run through ONNX Runtime on the gate seeds (latents to
  images through the family, :func:`rstr.compare.score_bundle`), is not worse than the fp32
  bundle's on every gate group -- within the noise or better -- with class accuracy kept; and
* **speed**: on ONNX Runtime CPU, its denoiser calls over the plan (B rows on unguided steps, 2B on
  guided ones) take less time than the fp32 graph's (interleaved, fastest of ``SPEED_REPS``):
  a reduced graph that runs slower, or in fp32 anyway, is not a win.

Otherwise fp32 ships and the record says why.  Models without a quality measure here
(``family.quality == "teacher"``) keep fp32 under ``auto``: nothing could show the loss is
acceptable.  An explicit ``--precision bf16|int8|int8-dynamic`` ships whatever the gate finds, and
the record says what it cost (the same comparison and timing, where they can be measured).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rstr.engines.bundle import Bundle
from rstr.export import stages
from rstr.export.graphs import external_data_path
from rstr.export.precision import (
    BACKENDS,
    bundle_with_denoiser,
    calibration_feeds,
    check_precision,
    convert,
    cpu_checkable,
)
from rstr.export.stages import Gate

from rstr.compare import Comparison, score_bundle
from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule
from rstr.seeds import GATE_SEEDS

log = logging.getLogger("rstr")
SPEED_REPS = 10
EXTERNAL_DATA_LIMIT = 2**31  # the converted graph is written as one file, which protobuf caps at 2 GB


@dataclass
class PrecisionRecord:
    """What was asked, tried and shipped, and what the gate measured."""

    requested: str
    shipped: str
    gate: Gate
    candidate: str | None = None
    conversion: dict | None = None
    speed: dict | None = None  # {"fp32_ms": .., "<candidate>_ms": .., "rows": .., "reps": ..}
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            **self.gate.to_json(),
            "requested": self.requested,
            "candidate": self.candidate,
            "shipped": self.shipped,
            "conversion": self.conversion,
            "speed": self.speed,
            **self.extra,
        }


def candidate_for(backend: str, tensorrt_engines: bool) -> str:
    """The reduced precision ``auto`` tries: bf16 where TensorRT engines are built, int8-dynamic on ONNX Runtime CPU."""
    return "bf16" if tensorrt_engines or backend == "tensorrt" else "int8-dynamic"


def choose_precision(
    family: Family,
    schedule: GuidanceSchedule,
    bundle: Bundle,
    requested: str,
    candidate: str,
    workdir: Path,
    measure: bool = True,
) -> PrecisionRecord:
    """Decide the denoiser's precision; when a reduced one ships, ``bundle``'s ``denoiser.onnx`` is replaced by it.

    ``measure`` False (``--no-measure``) skips the cost measurements of an explicit precision;
    ``auto`` always measures, since it decides by them.
    """
    if requested != "auto":
        check_precision(requested)
    if requested == "fp32":
        return PrecisionRecord("fp32", "fp32", Gate("precision", "fp32 requested (--precision fp32)"))
    explicit = requested != "auto"
    tried = check_precision(requested if explicit else candidate)
    if not explicit and family.quality != "digits":
        return PrecisionRecord(
            "auto",
            "fp32",
            Gate(
                "precision",
                f"fp32 ships: the model has no sample-quality measure here, so a {tried} bundle cannot be shown to keep "
                f"quality (pass --precision {tried} to ship it anyway)",
            ),
            candidate=tried,
        )
    src = bundle.graph_path("denoiser")
    data = external_data_path(src)  # the dynamo exporter's external weights
    if src.stat().st_size + (data.stat().st_size if data.exists() else 0) >= EXTERNAL_DATA_LIMIT:
        raise RstrError(f"--precision {tried}: converting a denoiser past 2 GB is not supported yet; use fp32")

    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rstr-precision-", dir=workdir) as tmp:
        tmp_dir = Path(tmp)
        reduced = tmp_dir / f"denoiser.{tried}.onnx"
        feeds = None
        if tried == "int8":
            log.info("precision: calibrating int8 activation ranges on the plan's denoiser inputs (calibration seeds)")
            feeds = calibration_feeds(bundle, family)
        log.info(f"precision: converting the denoiser to {tried}")
        conversion = convert(src, reduced, family, tried, feeds)
        view = bundle_with_denoiser(bundle, reduced, tmp_dir / "candidate", tried)
        record = PrecisionRecord(requested, tried, Gate("precision", ""), candidate=tried, conversion=conversion)
        measured = measure or not explicit
        if measured and family.quality == "digits":
            _gate_quality(record, family, schedule, bundle, view, tmp_dir)
        if measured and "onnxruntime-cpu" in BACKENDS[tried]:
            record.speed = denoiser_speed(bundle, view, tried)
        record.extra["measured"] = measured
        ship, why = _decide(record, explicit)
        record.gate.decision = why
        record.shipped = tried if ship else "fp32"
        if ship:
            shutil.copyfile(reduced, src)  # one file: the fp32 weights beside it go
            data.unlink(missing_ok=True)
    log.info(f"precision gate: {record.gate.decision}")
    return record


def _gate_quality(
    record: PrecisionRecord, family: Family, schedule: GuidanceSchedule, fp32: Bundle, reduced: Bundle, tmp: Path
) -> None:
    """The reduced bundle against the fp32 bundle on the gate seeds, both through ONNX Runtime CPU, paired."""
    num, groups = stages.GATE_NUM, stages.GATE_GROUPS  # the schedule and adapter gates' seeds
    kw = dict(seed_start=GATE_SEEDS.start, num=num, groups=groups)
    log.info(f"precision gate: {record.candidate} bundle against the fp32 bundle, {groups} x {num} gate seeds, paired")
    checked = cpu_checkable(reduced, tmp / "emulated")
    how = " (bf16 emulated on CPU)" if checked is not reduced else ""
    base = score_bundle(fp32, family, schedule, "fp32 bundle", **kw)
    side = score_bundle(checked, family, schedule, f"{record.candidate} bundle{how}", **kw)
    record.gate.comparisons.append(Comparison(side, base, GATE_SEEDS.start, num, groups))
    record.gate.chosen = 0
    log.info(f"  {record.gate.comparisons[0].describe()}")


def _decide(record: PrecisionRecord, explicit: bool) -> tuple[bool, str]:
    """Ship or not, and the sentence that says why."""
    p = record.candidate
    c = record.gate.shipped
    quality = (
        ("no quality measure here" if record.extra.get("measured", True) else "cost not measured (--no-measure)")
        if c is None
        else f"FD {c.verdict} against the fp32 bundle ({' / '.join(f'{d:+.3f}' for d in c.differences)} per gate group"
        f", accuracy {c.candidate.accuracy_mean:.3f} vs {c.baseline.accuracy_mean:.3f})"
    )
    speed = record.speed
    faster = speed is None or speed[f"{p}_ms"] < speed["fp32_ms"]
    timing = (
        "speed not measured" + (" here (no CPU kernels for it in ONNX Runtime)" if record.extra.get("measured", True) else "")
        if speed is None
        else f"denoiser over the plan {speed[f'{p}_ms']:.1f} ms vs {speed['fp32_ms']:.1f} ms fp32 (fastest of {speed['reps']})"
    )
    if explicit:
        return True, f"{p} ships (--precision {p}): {quality}; {timing}"
    if c is not None and (c.verdict == "worse" or not c.keeps_accuracy):
        return False, f"fp32 ships: the {p} bundle is worse ({quality}); {timing}"
    if not faster:
        return False, f"fp32 ships: the {p} bundle is no faster on ONNX Runtime CPU ({timing}); {quality}"
    return True, f"{p} ships: {quality}; {timing}"


def denoiser_speed(fp32: Bundle, reduced: Bundle, precision: str, reps: int = SPEED_REPS) -> dict:
    """Milliseconds of the plan's denoiser calls, fp32 graph vs ``reduced``, ONNX Runtime CPU, interleaved, fastest rep."""
    import onnxruntime as ort
    import torch

    threads = torch.get_num_threads()  # the build's thread count (rstr._cli.set_threads), as measure_speed uses

    def session(bundle: Bundle):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(str(bundle.graph_path("denoiser")), opts, providers=["CPUExecutionProvider"])

    sessions = {"fp32": session(fp32), precision: session(reduced)}
    plan = fp32.plan
    calls = {rows: sum(1 for s in plan.steps if plan.rows(s.guided) == rows) for rows in plan.denoiser_rows}
    rng = np.random.default_rng(0)
    best: dict[str, dict[int, float]] = {k: {} for k in sessions}
    for rows in calls:
        feed = {"sample": rng.standard_normal(fp32.batched_sample.concrete(rows), dtype=np.float32)}
        feed["timestep"] = np.full((rows,), plan.steps[len(plan.steps) // 2].model_timestep, np.float32)
        for d in fp32.cond_inputs:
            shape = d.concrete(rows)
            feed[d.name] = np.zeros(shape, d.np_dtype) if np.issubdtype(d.np_dtype, np.integer) else np.ones(shape, d.np_dtype)
        for s in sessions.values():
            s.run(None, feed)  # warm-up
        for r in range(reps):
            for name in sessions if r % 2 else reversed(list(sessions)):
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                dt = time.perf_counter() - t0
                best[name][rows] = min(best[name].get(rows, dt), dt)
    total = {name: sum(calls[rows] * t for rows, t in b.items()) * 1e3 for name, b in best.items()}
    return {"fp32_ms": total["fp32"], f"{precision}_ms": total[precision], "calls": calls, "reps": reps, "threads": threads}
