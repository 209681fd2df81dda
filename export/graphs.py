"""ONNX graphs of a bundle: the denoiser and the two step graphs.

* ``denoiser``: the family's transformer call (LoRA already merged), dynamic batch ``N``
  covering B and 2B, float32 I/O with the arithmetic precision (fp32/fp16/bf16) set inside
  the graph, since TensorRT 11 is strongly typed.
* ``step_guided`` / ``step_single``: the family's CFG combine and the linear scheduler update (with the
  history of past samples and model outputs for multistep solvers, :func:`linear_update`),
  so the runtime needs neither diffusers nor a scheduler.

Each family says which exporter gives graphs ONNX Runtime runs (``Family.export_dynamo``:
dynamo where it works, TorchScript otherwise, ``deployment.md``) and which patches make its
transformer traceable (``Family.export_patches``).  Graphs are cleaned and constant-folded with onnx-graphsurgeon
and polygraphy.

Memory: the dynamo exporter writes the weights as external data from the start (it streams
the model's own tensors to ``<graph>.onnx.data``; serialising them into one protobuf would
hold them twice more), and such a graph is cleaned on its structure alone: the weights are
never loaded into protobuf or numpy, and only constants that do not depend on them are
folded (ONNX Runtime and TensorRT fold the rest when they load the graph).  The cleaned graph's
weights are copied, in file chunks, to ``<graph>.onnx.data`` beside it, whatever their size:
loading a 0.5 GB graph whole to fold it with polygraphy peaked at 10x its weights (DiT-B/2,
docs/benchmarks.md, "Size ladder").  A TorchScript export (one file) is folded whole.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from rstr.families import torch_dtype
from rstr.families.base import Family, TensorSpec

OPSET = 18
EXTERNAL_DATA_BYTES = 2**31 - (64 << 20)  # weights past this go to <graph>.onnx.data (protobuf caps a file at 2 GB)
COPY_CHUNK = 64 << 20


class Denoiser(nn.Module):
    """``(sample, timestep, *cond) -> model_output`` with float32 I/O and the model's dtype inside (``Family.predict``)."""

    def __init__(self, family: Family):
        super().__init__()
        self.family = family
        self.transformer = family.transformer  # registered so the exporter sees the weights
        self.cond_names = [s.name for s in family.cond_specs()]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.family.predict(sample, timestep, dict(zip(self.cond_names, cond)))


def linear_update(sample, eps, coef_sample, coef_eps, history=None):
    """The plan's update rule (docs/bundle.md): ``a x + b eps`` and, with a history ``[B, k, 2, ...]`` of past
    (sample, model output) pairs, their terms too; returns ``x_next`` and the history the next step reads."""
    if history is None:
        return coef_sample * sample + coef_eps * eps, None
    terms = torch.cat([torch.stack([sample, eps], 1).unsqueeze(1), history], 1)  # [B, k + 1, 2, ...]
    coefs = torch.stack([coef_sample, coef_eps], 1).reshape(1, -1, 2, *[1] * (sample.dim() - 1))
    return (terms * coefs).sum((1, 2)), terms[:, : history.shape[1]]


class GuidedStep(nn.Module):
    """``x_next = a x + b combine(out[:B], out[B:], w)`` (plus past terms); also returns ``[x_next; x_next]``."""

    def __init__(self, family: Family):
        super().__init__()
        self.family = family

    def forward(self, sample, model_output, scale, coef_sample, coef_eps, history=None):
        b = sample.shape[0]
        eps = self.family.combine(model_output[:b], model_output[b:], scale)
        nxt, past = linear_update(sample, eps, coef_sample, coef_eps, history)
        return (nxt, torch.cat([nxt, nxt])) if past is None else (nxt, torch.cat([nxt, nxt]), past)


class SingleStep(nn.Module):
    """``x_next = a x + b single(out)`` (plus past terms); also returns ``[x_next; x_next]``."""

    def __init__(self, family: Family):
        super().__init__()
        self.family = family

    def forward(self, sample, model_output, coef_sample, coef_eps, history=None):
        nxt, past = linear_update(sample, self.family.single(model_output), coef_sample, coef_eps, history)
        return (nxt, torch.cat([nxt, nxt])) if past is None else (nxt, torch.cat([nxt, nxt]), past)


# --------------------------------------------------------------------------- export
def _example(spec: TensorSpec, batch: int) -> torch.Tensor:
    shape = spec.concrete(batch)
    if spec.dtype == torch.int64:
        return torch.zeros(shape, dtype=torch.int64)
    if spec.example is not None:
        return torch.full(shape, spec.example)
    return torch.randn(shape)


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    batch_axes: dict[str, str],
    dynamo: bool,
) -> None:
    """Export with dynamic axes named in ``batch_axes`` (input/output name -> axis symbol)."""
    with warnings.catch_warnings(), _quiet_exporters():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {"batch": torch.export.Dim("batch", min=1, max=4096)}
            dims["batch2"] = 2 * dims["batch"]
            dynamic_shapes: list[Any] = [({0: dims[batch_axes[n]]} if n in batch_axes else None) for n in input_names]
            if isinstance(module, Denoiser):  # forward(sample, timestep, *cond): varargs form one tuple
                dynamic_shapes = [*dynamic_shapes[:2], tuple(dynamic_shapes[2:])]
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                verbose=False,
            )
            assert program is not None  # the dynamo exporter returns its program
            program.save(str(path), external_data=True)  # streamed: see the module docstring
        else:
            axes = {n: {0: batch_axes[n]} for n in [*input_names, *output_names] if n in batch_axes}
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )


def export_graph(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    batch_axes: dict[str, str],
    dynamo: bool,
) -> None:
    """Export ``module`` to ``path``, cleaned (:func:`clean`).

    The exporter writes into a scratch folder beside ``path``, so that its external data (one
    file per tensor from the TorchScript exporter) never mixes with the bundle's files.
    """
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        raw = Path(scratch) / path.name
        _export(module, args, raw, input_names, output_names, batch_axes, dynamo)
        clean(raw, path)


def clean(src: Path, dst: Path | None = None) -> None:
    """Fold constants (polygraphy / graphsurgeon), drop dead nodes, save to ``dst`` (default: in place).

    A graph with external weights (the dynamo exporter's) is cleaned on its structure alone
    (:func:`_clean_structure`) and its weights copied in chunks to ``<dst>.onnx.data``; a graph in
    one file (TorchScript's) is folded whole and saved in one file unless its weights pass 2 GB.
    """
    from polygraphy.backend.onnx import fold_constants

    dst = dst or src
    model = onnx.load(str(src), load_external_data=False)
    declared = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        with _quiet_exporters():
            model = _clean_structure(model)
        _restore_io_shapes(model, declared)
        _refuse_float64(model, dst)
        _gather_external_data(model, src.parent, dst)
        onnx.save_model(model, str(dst))
        return
    import onnx_graphsurgeon as gs

    with _quiet_exporters():
        model = fold_constants(model, allow_onnxruntime_shape_inference=False, error_ok=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    _restore_io_shapes(model, declared)
    _refuse_float64(model, dst)
    # Sized by its initializers: ModelProto.ByteSize() itself fails on a model past 2 GB.
    if sum(t.ByteSize() for t in model.graph.initializer) >= EXTERNAL_DATA_BYTES:
        location = external_data_path(dst).name
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    else:
        onnx.save_model(model, str(dst))


def external_data_path(graph: Path) -> Path:
    """Where a bundle graph's external weights live: ``<graph>.data`` beside it (relative in the graph)."""
    return graph.with_name(graph.name + ".data")


def _clean_structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold and clean without reading the external weights: nodes that consume them are not folded."""
    import onnx_graphsurgeon as gs

    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    graph = gs.import_onnx(model)  # external initializers stay unread TensorProtos (graphsurgeon's lazy values)
    graph.fold_constants(error_ok=True, should_exclude_node=lambda node: any(t.name in external for t in node.inputs))
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def _gather_external_data(model: onnx.ModelProto, src_dir: Path, dst: Path) -> None:
    """Copy every external tensor of ``model`` (files under ``src_dir``) into ``<dst>.data``, in chunks; repoint them."""
    from onnx.external_data_helper import ExternalDataInfo

    location = external_data_path(dst).name
    with open(dst.parent / location, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            offset = out.tell()
            with open(src_dir / info.location, "rb") as fh:
                fh.seek(info.offset or 0)
                left = info.length if info.length is not None else (src_dir / info.location).stat().st_size - (info.offset or 0)
                while left > 0:
                    chunk = fh.read(min(COPY_CHUNK, left))
                    if not chunk:
                        raise RuntimeError(f"external data of {tensor.name} ends early in {info.location}")
                    out.write(chunk)
                    left -= len(chunk)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", out.tell() - offset)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporter's and polygraphy's own logs (torchvision notes, folding passes) only at rstr's debug level."""
    if logging.getLogger("rstr").isEnabledFor(logging.DEBUG):
        yield
        return
    from polygraphy.logger import G_LOGGER

    torch_log, severity = logging.getLogger("torch"), G_LOGGER.module_severity
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    G_LOGGER.module_severity, G_LOGGER.colors = G_LOGGER.ERROR, False
    try:
        yield
    finally:
        torch_log.setLevel(level)
        G_LOGGER.module_severity = severity


def _restore_io_shapes(model: onnx.ModelProto, declared: dict[str, list]) -> None:
    """Keep the exporter's declared I/O shapes (symbolic batch axes) through folding and cleanup."""
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        for d, want in zip(dims, declared.get(v.name, [])):
            if isinstance(want, str) and want:
                d.dim_param = want
            else:
                d.dim_value = want


def _refuse_float64(model: onnx.ModelProto, path: Path) -> None:
    """TensorRT has no float64: a graph that still computes in double is an export bug."""
    double = onnx.TensorProto.DOUBLE
    bad = [i.name for i in model.graph.initializer if i.data_type == double]
    bad += [
        n.name for n in model.graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i == double for a in n.attribute)
    ]
    if bad:
        raise RuntimeError(f"{path.name} computes in float64 at {bad[:3]}; TensorRT cannot run it")


def export_denoiser(family: Family, path: Path, dtype: str = "fp32", batch: int = 1) -> None:
    """Export the family's transformer call with a dynamic batch axis, computing in ``dtype``.

    The build loads the model in ``dtype`` already; a model held in another dtype is converted in
    place for the export and converted back.
    """
    target = torch_dtype(dtype)
    specs = family.graph_inputs()
    module = Denoiser(family).eval()
    original = family.dtype
    if original != target:  # diffusers warns on every .to(dtype), even a no-op one
        family.transformer.to(target)
    try:
        args = tuple(_example(s, 2 * max(batch, 1)) for s in specs)
        names = [s.name for s in specs]
        with family.export_patches(), torch.no_grad():
            export_graph(
                module,
                args,
                path,
                names,
                ["model_output"],
                {n: "batch" for n in [*names, "model_output"]},
                family.export_dynamo,
            )
    finally:
        if original != target:
            family.transformer.to(original)


def export_steps(family: Family, directory: Path, batch: int = 1, history: int = 0) -> None:
    """Export ``step_guided.onnx`` and ``step_single.onnx`` (tiny, always fp32); with ``history`` k > 0 they
    also read and write the ``[B, k, 2, ...]`` history of past (sample, model output) pairs."""
    b = max(batch, 2)
    x = torch.randn(family.sample_shape(b))
    out1 = torch.randn(family.output_shape(b))
    out2 = torch.randn(family.output_shape(2 * b))
    coefs = (torch.ones(1), torch.ones(history + 1), torch.ones(history + 1))  # scale, coef_sample, coef_eps
    past: tuple = (torch.randn(b, history, 2, *x.shape[1:]),) if history else ()
    extra_in, extra_out = (["history"], ["next_history"]) if history else ([], [])
    axes = {"sample": "batch", "next_sample": "batch", "next_sample_pair": "batch2", "history": "batch", "next_history": "batch"}
    with torch.no_grad():
        export_graph(
            GuidedStep(family).eval(),
            (x, out2, *coefs, *past),
            directory / "step_guided.onnx",
            ["sample", "model_output", "scale", "coef_sample", "coef_eps", *extra_in],
            ["next_sample", "next_sample_pair", *extra_out],
            {**axes, "model_output": "batch2"},
            dynamo=False,
        )
        export_graph(
            SingleStep(family).eval(),
            (x, out1, *coefs[1:], *past),
            directory / "step_single.onnx",
            ["sample", "model_output", "coef_sample", "coef_eps", *extra_in],
            ["next_sample", "next_sample_pair", *extra_out],
            {**axes, "model_output": "batch"},
            dynamo=False,
        )


def graph_description(family: Family, batch: int, history: int = 0) -> dict:
    """The manifest's ``graphs`` section: each graph's inputs and outputs, described once."""
    sample = TensorSpec("sample", torch.float32, ("batch", *family.sample_shape(1)[1:]))
    out_b = TensorSpec("model_output", torch.float32, ("batch", *family.output_shape(1)[1:]))
    out_2b = TensorSpec("model_output", torch.float32, ("batch2", *family.output_shape(1)[1:]))
    coefs = [TensorSpec(n, torch.float32, (history + 1,)) for n in ("coef_sample", "coef_eps")]
    nexts = [
        TensorSpec("next_sample", torch.float32, sample.shape),
        TensorSpec("next_sample_pair", torch.float32, ("batch2", *sample.shape[1:])),
    ]
    if history:
        past = ("batch", history, 2, *sample.shape[1:])
        coefs.append(TensorSpec("history", torch.float32, past))
        nexts.append(TensorSpec("next_history", torch.float32, past))
    as_json = lambda specs: [s.to_json() for s in specs]  # noqa: E731
    return {
        "denoiser": {
            "file": "denoiser.onnx",
            "inputs": as_json(family.graph_inputs()),
            "outputs": as_json([family.graph_output()]),
        },
        "step_guided": {
            "file": "step_guided.onnx",
            "inputs": as_json([sample, out_2b, TensorSpec("scale", torch.float32, (1,)), *coefs]),
            "outputs": as_json(nexts),
        },
        "step_single": {"file": "step_single.onnx", "inputs": as_json([sample, out_b, *coefs]), "outputs": as_json(nexts)},
    }
