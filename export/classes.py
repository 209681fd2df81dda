"""The class table graph: class labels in, for text models whose prompts are a class table.

The digits reference models of the text families (:mod:`rstr.families.class_embeddings`) take
prompt embeddings like their full-size counterparts; their "prompt" for class ``k`` is row ``k``
of a table.  The bundle ships that table as the graph ``class_embeddings`` (``class_labels [N]``
int64 in, every conditioning input out, gathered from the table's rows) and the manifest's
``classes`` section, so that ``rstr-export run --class 3`` and ``Pipeline({"class_labels": [3]})``
work on them as on a DiT bundle, and raw embeddings still go in unchanged.  A prompt set
(``--prompts``) is a table too, but of prompts, not classes: it is not shipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rstr.export.graphs import export_graph
from torch import nn

from rstr.families.base import Family, TensorSpec

GRAPH = "class_embeddings"


class ClassTableGraph(nn.Module):
    """``class_labels [N] -> (row of each table, ...)``, in the table's input order."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(tables)
        for i, name in enumerate(self.names):
            self.register_buffer(f"table_{i}", tables[name].detach().clone())

    def forward(self, class_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"table_{i}")[class_labels] for i in range(len(self.names)))


def has_class_table(family: Family) -> bool:
    """Whether the bundle gets the class table: the model's own classes, not a prompt set."""
    return family.class_embeddings is not None and family.prompts is None


def export_class_table(family: Family, path: Path) -> None:
    """``class_embeddings.onnx`` with a dynamic batch."""
    assert family.class_embeddings is not None  # has_class_table() was checked
    graph = ClassTableGraph(family.class_embeddings.tables).eval()
    labels = torch.arange(2, dtype=torch.int64)
    with torch.no_grad():
        export_graph(
            graph, (labels,), path, ["class_labels"], graph.names, {n: "batch" for n in ["class_labels", *graph.names]}, True
        )


def class_graph(family: Family) -> dict:
    """The manifest's ``graphs`` entry: the labels in, each conditioning input out (shaped as the denoiser takes it)."""
    specs = {s.name: s for s in family.cond_specs()}
    assert family.class_embeddings is not None
    outputs = [specs[name].to_json() for name in family.class_embeddings.tables]
    return {
        "file": f"{GRAPH}.onnx",
        "inputs": [TensorSpec("class_labels", torch.int64, ("batch",)).to_json()],
        "outputs": outputs,
    }


def classes_section(family: Family) -> dict:
    """The manifest's ``classes``."""
    table = family.class_embeddings
    assert table is not None
    return {"graph": GRAPH, "num_classes": table.num_classes, "negative_row": table.negative_row}


def class_reference(family: Family) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Every row's labels (the negative row included) and the table's rows: what the graph must return."""
    table = family.class_embeddings
    assert table is not None
    labels = torch.arange(table.num_classes + 1, dtype=torch.int64)
    return {"class_labels": labels.numpy()}, [t[labels].numpy() for t in table.tables.values()]
