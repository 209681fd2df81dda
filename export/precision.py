"""Reduced precision for a bundle's denoiser: bf16 or int8 after export, the sensitive layers kept in fp32.

A post-export step on the fp32 ``denoiser.onnx`` (so it composes with any ``--dtype`` loading
and export): :func:`convert` writes the graph at another precision; :mod:`rstr.export.precision_gate`
decides whether it ships.

**Which layers.**  The ``nn.Linear`` layers inside the transformer blocks (``Family.blocks()``):
attention projections and MLPs, nearly all of the arithmetic.  Kept in fp32: every Linear inside
a normalisation or embedding module (adaLN modulation, the timestep/class embedders a block may
own), everything outside the blocks (patch and timestep/class/caption embeddings, the final norm
and projection), the norms themselves, softmax and the attention score products (activation by
activation).  ONNX nodes are matched to modules by their weights -- each Linear's weight, or its
transpose, is one initializer of the graph -- the way TensorRT's diffusion demo refits LoRA
weights, so this holds for both exporters and every family.

**Precisions** (what each backend runs; ``BACKENDS``):

* ``int8-dynamic``: ONNX Runtime's ``quantize_dynamic``: int8 weights per output channel,
  activations quantized per call (ONNX Runtime CPU fuses them into ``DynamicQuantizeMatMul``).
  Needs no calibration.  TensorRT has no dynamic quantization ops.
* ``int8``: ONNX Runtime's ``quantize_static`` in QDQ form, symmetric (zero points 0, as
  TensorRT requires): int8 weights per output channel, activation scales calibrated (min/max)
  on the denoiser inputs the bundle's own plan produces from the Stage-2 calibration seeds
  (:data:`rstr.seeds.CALIBRATION_SEEDS`).  ONNX Runtime CPU runs it (QDQ fused to integer
  kernels) and so does TensorRT (explicit quantization: the Q/DQ pairs are in the ONNX, as
  strongly typed networks require).

Both int8 forms quantize weights to 7 bits (``reduce_range``): without VNNI (this project's AVX2
CPU) ONNX Runtime multiplies u8 by s8 with ``vpmaddubsw``, whose 16-bit sums saturate; on the
reference model full-range int8 weights gave 19% error on one denoiser call, 7-bit ones 1%.
* ``bf16``: the selected MatMul/Gemm nodes compute in bfloat16 (weights stored in bf16, a Cast
  in and out; graph I/O stays fp32), for TensorRT (strongly typed: precision lives in the ONNX)
  and ONNX Runtime CUDA.  ONNX Runtime's CPU provider has no bf16 MatMul, Gemm or Add kernels
  (1.32), so it cannot run the graph: :func:`emulate_bf16` rewrites it with the same roundings
  around fp32 arithmetic, which is how a machine without a GPU verifies and gates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, cast

import numpy as np
import onnx
from onnx import numpy_helper
from rstr.engines.base import check_inputs
from rstr.engines.bundle import Bundle
from torch import nn

from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.seeds import CALIBRATION_SEEDS

log = logging.getLogger("rstr")
Precision = Literal["fp32", "bf16", "int8", "int8-dynamic"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8", "int8-dynamic")
# Which backends run each precision (bundle graphs are checked on ONNX Runtime CPU whatever the backend).
BACKENDS = {
    "fp32": ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"),
    "bf16": ("onnxruntime-cuda", "tensorrt"),
    "int8": ("onnxruntime-cpu", "tensorrt"),
    "int8-dynamic": ("onnxruntime-cpu", "onnxruntime-cuda"),
}
CALIBRATION_IMAGES = 64  # images whose per-step denoiser inputs calibrate the static int8 scales
# Rows per calibration call: the calibrator's model outputs every activation's range, and ONNX Runtime's
# CPU arena keeps the largest call's activations; whole feeds (64-128 rows) of a DiT-S/2-shaped
# denoiser took more than 24 GB.
CALIBRATION_ROWS = 4
WEIGHTED_OPS = ("MatMul", "Gemm")


def check_precision(precision: str) -> Precision:
    """``precision`` when it is one rstr converts to; else one error line."""
    if precision not in PRECISIONS:
        raise RstrError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)} (or auto)")
    return cast(Precision, precision)


# ---------------------------------------------------------------------- layer selection
def reduced_linears(family: Family) -> set[str]:
    """Qualified names (in ``family.transformer``) of the Linear layers computed in reduced precision."""
    modules = dict(family.transformer.named_modules())
    out = set()
    for block_name, _ in family.blocks():
        prefix = block_name + "."
        for name, module in modules.items():
            if not (isinstance(module, nn.Linear) and name.startswith(prefix)):
                continue
            parents = [name[:i] for i in range(len(prefix) - 1, len(name)) if name[i] == "."]
            if not any(_keeps_fp32(modules[p]) for p in parents if p in modules and p != block_name):
                out.add(name)
    return out


def _keeps_fp32(module: nn.Module) -> bool:
    """Normalisation and embedding modules (adaLN, timestep/class embedders) keep their Linears in fp32."""
    kind = type(module).__name__
    return "Norm" in kind or "Embed" in kind


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def weighted_nodes(model: onnx.ModelProto, family: Family) -> dict[str, str]:
    """ONNX MatMul/Gemm node name -> the transformer Linear whose weight (or its transpose) it multiplies by."""
    owners: dict[str, str] = {}
    for name, module in family.transformer.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach().float().cpu().numpy()
            owners[_digest(w)] = owners[_digest(w.T)] = name
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight = next((x for x in node.input[1:2] if x in inits), None)
        owner = None if weight is None else owners.get(_digest(numpy_helper.to_array(inits[weight])))
        if owner is not None:
            out[node.name] = owner
    return out


def select_nodes(model: onnx.ModelProto, family: Family, owners: dict[str, str] | None = None) -> list[str]:
    """Names of the nodes to compute in reduced precision (see the module docstring); ``owners`` from :func:`weighted_nodes`."""
    chosen = reduced_linears(family)
    owners = weighted_nodes(model, family) if owners is None else owners
    nodes = [n for n, owner in owners.items() if owner in chosen]
    if not nodes:
        raise RuntimeError(
            f"no MatMul/Gemm of the exported denoiser matches the {len(chosen)} block Linear layers by weight; "
            "the exporter changed how it stores weights"
        )
    return nodes


# ---------------------------------------------------------------------------- convert
def convert(
    src: Path, dst: Path, family: Family, precision: Precision, calibration: list[dict[str, np.ndarray]] | None = None
) -> dict:
    """Write ``src`` (fp32 denoiser) at ``precision`` to ``dst``; return what was done (for the manifest summary)."""
    check_precision(precision)
    model = onnx.load(str(src))
    owners = weighted_nodes(model, family)
    nodes = select_nodes(model, family, owners)
    with _quiet_quantizer():
        _write(model, src, dst, nodes, precision, calibration)
    return {
        "precision": precision,
        "reduced_layers": len(nodes) if precision != "fp32" else 0,
        "linear_layers": len(owners),
        "kept_fp32": "norms, embeddings (patch, timestep, class/caption), adaLN modulation, the final layer, attention scores",
        "calibration": None if precision != "int8" else {"inputs": len(calibration or ()), "seeds_from": CALIBRATION_SEEDS.start},
    }


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer warns on the root logger ("consider pre-processing"): shown only at rstr's debug level."""
    root = logging.getLogger()
    level = root.level
    if not log.isEnabledFor(logging.DEBUG):
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _write(
    model: onnx.ModelProto, src: Path, dst: Path, nodes: list[str], precision: str, calibration: list[dict] | None
) -> None:
    """Write ``model`` (loaded from ``src``) to ``dst`` with ``nodes`` at ``precision``."""
    if precision == "fp32":
        onnx.save_model(model, str(dst))
    elif precision == "bf16":
        onnx.save_model(to_bf16(model, nodes), str(dst))
    elif precision == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_quantize=nodes,
            op_types_to_quantize=list(WEIGHTED_OPS),
        )
    else:
        if not calibration:
            raise RuntimeError("static int8 needs calibration inputs")
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        quantize_static(
            src,
            dst,
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_quantize=nodes,
            op_types_to_quantize=list(WEIGHTED_OPS),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            calibration_providers=["CPUExecutionProvider"],
        )


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds, :data:`CALIBRATION_ROWS` rows per call.

    Min/max over the row chunks equals min/max over the whole feeds; small calls keep the
    calibration session's memory small.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = (
            {name: value[i : i + CALIBRATION_ROWS] for name, value in feed.items()}
            for feed in feeds
            for i in range(0, len(feed["sample"]), CALIBRATION_ROWS)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


# ------------------------------------------------------------------------------- bf16
def to_bf16(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """``nodes`` (MatMul/Gemm) computed in bfloat16: weights (and Gemm bias) stored in bf16, Cast in and out."""
    import ml_dtypes

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    chosen = set(nodes)
    out_nodes: list[onnx.NodeProto] = []
    converted: dict[str, str] = {}  # fp32 initializer -> its bf16 copy (weights shared by several nodes)
    for node in graph.node:
        if node.name not in chosen:
            out_nodes.append(node)
            continue
        new_inputs = []
        for k, name in enumerate(node.input):
            if name in inits and k >= 1:
                if name not in converted:
                    array = numpy_helper.to_array(inits[name]).astype(ml_dtypes.bfloat16)
                    graph.initializer.append(numpy_helper.from_array(array, name + ".bf16"))
                    converted[name] = name + ".bf16"
                new_inputs.append(converted[name])
            else:
                cast = f"{node.name}.in{k}.bf16"
                out_nodes.append(onnx.helper.make_node("Cast", [name], [cast], name=cast, to=onnx.TensorProto.BFLOAT16))
                new_inputs.append(cast)
        result = node.output[0]
        low = f"{node.name}.out.bf16"
        node.ClearField("input")
        node.input.extend(new_inputs)
        node.output[0] = low
        out_nodes.append(node)
        out_nodes.append(onnx.helper.make_node("Cast", [low], [result], name=low + ".fp32", to=onnx.TensorProto.FLOAT))
    graph.ClearField("node")
    graph.node.extend(out_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    del graph.value_info[:]  # shapes are re-inferred by the runtimes; stale fp32 types would be wrong
    onnx.checker.check_model(model)
    return model


def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The bf16 graph (rewritten in place) with every bf16 MatMul/Gemm computed in fp32 on bf16-rounded operands,
    rounded back to bf16.

    The roundings are the bf16 graph's (weights, activations into each product, its result);
    only the accumulation is fp32 rather than the GPU kernel's, which accumulates in fp32 as well.
    ONNX Runtime's CPU provider runs this graph (Cast between float and bfloat16 is all it needs).
    """
    graph = model.graph
    bf16 = onnx.TensorProto.BFLOAT16
    low_inits = {i.name for i in graph.initializer if i.data_type == bf16}
    low_casts = {o for n in graph.node if n.op_type == "Cast" and _cast_to(n) == bf16 for o in n.output}
    out_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS or not any(i in low_inits for i in node.input):
            out_nodes.append(node)
            continue
        ups = []
        for name in node.input:
            if name in low_inits or name in low_casts:
                up = f"{name}.{node.name}.fp32"
                out_nodes.append(onnx.helper.make_node("Cast", [name], [up], name=up, to=onnx.TensorProto.FLOAT))
                ups.append(up)
            else:
                ups.append(name)
        result = node.output[0]
        wide = result + ".fp32"
        node.ClearField("input")
        node.input.extend(ups)
        node.output[0] = wide
        out_nodes.append(node)
        out_nodes.append(onnx.helper.make_node("Cast", [wide], [result], name=wide + ".round", to=bf16))
    graph.ClearField("node")
    graph.node.extend(out_nodes)
    return model


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def is_bf16(path: Path) -> bool:
    """Whether a graph holds bfloat16 weights (a ``bf16`` precision denoiser)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(i.data_type == onnx.TensorProto.BFLOAT16 for i in model.graph.initializer)


# ------------------------------------------------------------------------ calibration
def calibration_feeds(bundle: Bundle, family: Family, images: int = CALIBRATION_IMAGES) -> list[dict[str, np.ndarray]]:
    """The denoiser's inputs at every step of the plan, from ``images`` calibration seeds, run through the fp32 bundle.

    Exactly what the deployed graph sees: ``sample`` is the latents the plan produces (doubled to
    ``[x; x]`` on guided steps), ``timestep`` the step's, the conditioning ``[cond; uncond]`` on
    guided steps.  Classes cycle ``i % num_classes``; models without classes use their example
    conditioning.
    """
    from rstr.engines.onnxruntime import OnnxRuntimeRunner

    from rstr.evaluate import noise_for_seeds

    seeds = range(CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.start + images)
    noise = noise_for_seeds(family, seeds).numpy()
    if family.num_classes is not None:
        import torch

        c, u = family.conditioning_for(torch.arange(images) % family.num_classes)
    else:
        c, u = family.example_conditioning(images, seed=CALIBRATION_SEEDS.start)
    to_np = lambda d: None if d is None else {k: v.cpu().numpy() for k, v in d.items()}  # noqa: E731
    at = bundle.with_batch(images)
    noise, cond, uncond = check_inputs(at, noise, to_np(c), to_np(u))
    trace: list[np.ndarray] = []
    with OnnxRuntimeRunner(at, device="cpu") as runner:
        runner.infer(noise, cond, uncond, trace=trace)
    xs = [noise * np.float32(at.plan.init_noise_sigma), *trace[:-1]]
    feeds = []
    for x, step in zip(xs, at.steps):
        rows = at.plan.rows(step.guided)
        feed = {"sample": np.concatenate([x, x]) if step.guided else x}
        feed["timestep"] = np.full((rows,), step.model_timestep, np.float32)
        for name, value in cond.items():
            feed[name] = np.concatenate([value, uncond[name]]) if step.guided else value
        feeds.append(feed)
    return feeds


# ------------------------------------------------------------------------------ views
def bundle_with_denoiser(bundle: Bundle, denoiser: Path, workdir: Path, precision: str) -> Bundle:
    """``bundle``'s plan and step graphs with another denoiser graph, in ``workdir``: checked before it ships."""
    import shutil
    from dataclasses import replace

    from rstr.export.bundle import bundle_files, file_table

    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("step_guided", "step_single"):
        shutil.copyfile(bundle.graph_path(name), workdir / Path(bundle.manifest.graphs[name].file).name)
    shutil.copyfile(denoiser, workdir / "denoiser.onnx")
    graphs = {n: replace(g, file=Path(g.file).name) for n, g in bundle.manifest.graphs.items()}
    files = file_table(workdir, bundle_files(workdir))  # a runner opens only listed graphs
    return Bundle(workdir, replace(bundle.manifest, graphs=graphs, precision=precision, files=files))


def cpu_checkable(bundle: Bundle, workdir: Path) -> Bundle:
    """A bundle ONNX Runtime CPU can run with the same numerics: bf16 graphs emulated (:func:`emulate_bf16`)."""
    if bundle.manifest.precision != "bf16":
        return bundle
    emulated = workdir / "denoiser.bf16-emulated.onnx"
    workdir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(emulate_bf16(onnx.load(str(bundle.graph_path("denoiser")))), str(emulated))
    return bundle_with_denoiser(bundle, emulated, workdir / "view", "bf16-emulated")
