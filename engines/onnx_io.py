"""An ONNX graph's inputs, outputs and external-data files, read from the protobuf wire format.

``rstr.engines`` runs without the ``onnx`` package (and must not start an ONNX Runtime session
just to check a bundle), so this walks the few messages it needs by their field numbers
(onnx/onnx.proto): ``ModelProto.graph`` (7); ``GraphProto.initializer`` (5), ``input`` (11),
``output`` (12); ``ValueInfoProto.name`` (1), ``type`` (2); ``TypeProto.tensor_type`` (1);
``TypeProto.Tensor.elem_type`` (1), ``shape`` (2); ``TensorShapeProto.dim`` (1);
``Dimension.dim_value`` (1), ``dim_param`` (2); ``TensorProto.name`` (8),
``external_data`` (13); ``StringStringEntryProto.key`` (1), ``value`` (2).  Everything else,
weights included, is skipped by length without being read.  The C++ runtime has the same
reader (engines/cpp/src/onnx_io.cpp).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

# TensorProto.DataType -> the manifest's spelling (others keep their number).
ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


class OnnxFormatError(ValueError):
    """The bytes are not an ONNX model this reader understands."""


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output: ``shape`` holds ints, dimension names, or None for an unknown dimension."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    initializers: frozenset[str]
    external_files: frozenset[str]  # ``location`` of every initializer kept in external data


def _fields(buf: memoryview, start: int, end: int):
    """Yield ``(field number, wire type, value)`` of the message in ``buf[start:end]``; a length-delimited
    value is its ``(start, end)``, a varint its int, fixed-size values are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise OnnxFormatError("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise OnnxFormatError("a message runs past its end")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxFormatError("a name is not UTF-8") from None


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor(buf: memoryview, span: tuple[int, int]) -> GraphTensor:
    name, dtype = "", "undefined"
    shape: tuple[int | str | None, ...] = ()
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 2:
            name = _text(buf, value)
        elif number == 2 and wire == 2:
            for tnum, twire, tval in _fields(buf, *value):
                if tnum == 1 and twire == 2:  # tensor_type
                    dtype, shape = _tensor_type(buf, tval)
    return GraphTensor(name, dtype, shape)


def _tensor_type(buf: memoryview, span: tuple[int, int]) -> tuple[str, tuple[int | str | None, ...]]:
    dtype, dims = "undefined", []
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 0:
            dtype = ELEM_TYPES.get(value, f"onnx type {value}")
        elif number == 2 and wire == 2:
            for snum, swire, sval in _fields(buf, *value):
                if snum == 1 and swire == 2:
                    dim: int | str | None = None
                    for dnum, dwire, dval in _fields(buf, *sval):
                        if dnum == 1 and dwire == 0:
                            dim = _signed(dval)
                        elif dnum == 2 and dwire == 2:
                            dim = _text(buf, dval)
                    dims.append(dim)
    return dtype, tuple(dims)


def _initializer(buf: memoryview, span: tuple[int, int]) -> tuple[str, str | None]:
    """The initializer's name and, when its data is external, the file it names."""
    name, location = "", None
    for number, wire, value in _fields(buf, *span):
        if number == 8 and wire == 2:
            name = _text(buf, value)
        elif number == 13 and wire == 2:
            entry = {n: _text(buf, v) for n, w, v in _fields(buf, *value) if w == 2}
            if entry.get(1) == "location":
                location = entry.get(2, "")
    return name, location


def read_graph_io(path: Path) -> GraphIO:
    """Inputs, outputs, initializer names and external-data files of the ONNX model in ``path``."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise OnnxFormatError("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                return _model(buf, size)
            finally:
                buf.release()


def _model(buf: memoryview, size: int) -> GraphIO:
    inputs, outputs, initializers, external = [], [], set(), set()
    graphs = 0
    for number, wire, value in _fields(buf, 0, size):
        if number != 7 or wire != 2:
            continue
        graphs += 1
        for gnum, gwire, gval in _fields(buf, *value):
            if gwire != 2:
                continue
            if gnum == 11:
                inputs.append(_tensor(buf, gval))
            elif gnum == 12:
                outputs.append(_tensor(buf, gval))
            elif gnum == 5:
                name, location = _initializer(buf, gval)
                initializers.add(name)
                if location is not None:
                    external.add(location)
    if graphs != 1:
        raise OnnxFormatError("no graph in the model" if graphs == 0 else "more than one graph in the model")
    return GraphIO(tuple(inputs), tuple(outputs), frozenset(initializers), frozenset(external))
