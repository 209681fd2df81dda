"""A class-indexed table of conditioning tensors: the "text encoder" of rstr's text-conditioned reference models.

The digits reference models of the text families (PixArt-alpha, FLUX, Qwen-Image) take prompt
embeddings like their full-size counterparts; their "prompt" for class ``k`` is a fixed row of
this table, and the negative (empty) prompt is the row ``negative_row``.  On disk, beside the
transformer::

    class_embeddings/config.json              {"format": "rstr.class-embeddings/1", "num_classes": 10,
                                               "negative_row": 10, "inputs": [names...]}
    class_embeddings/embeddings.safetensors   one float32 tensor per conditioning input,
                                              [num_classes + 1, *row_shape]

A *prompt set* (``--prompts FILE``, :meth:`ClassEmbeddings.load_prompts`) is the same table for a
model without classes: prompts as rows, the negative prompt last, so that search, calibration and
evaluation draw conditioning the same way for every family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rstr.errors import ModelError

if TYPE_CHECKING:
    from rstr.families.base import TensorSpec

FORMAT = "rstr.class-embeddings/1"
PROMPTS_FORMAT = "rstr.prompts/1"
DIRECTORY = "class_embeddings"


@dataclass(frozen=True)
class ClassEmbeddings:
    """Rows of conditioning tensors by class; ``negative_row`` holds the empty prompt."""

    tables: dict[str, torch.Tensor]
    num_classes: int
    negative_row: int

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning for row indices ``index`` (``[N]`` int64), each input ``[N, *row_shape]``."""
        return {name: table[index.cpu()] for name, table in self.tables.items()}

    def negative(self, batch: int) -> dict[str, torch.Tensor]:
        """The empty prompt repeated ``batch`` times."""
        return self.rows(torch.full((batch,), self.negative_row, dtype=torch.int64))

    @classmethod
    def load(cls, directory: Path, specs: list[TensorSpec]) -> ClassEmbeddings:
        """Read and check a model's table (``class_embeddings/``) for a denoiser with conditioning ``specs``."""
        config_path, weights = directory / "config.json", directory / "embeddings.safetensors"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise ModelError(f"{config_path} is not a readable JSON file ({err})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ModelError(f"{config_path}: expected a JSON object with format {FORMAT!r}")
        n, neg, names = config.get("num_classes"), config.get("negative_row"), config.get("inputs")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(neg, int) or not 0 <= neg <= n:
            raise ModelError(f"{config_path}: num_classes must be an integer >= 1 and negative_row in [0, num_classes]")
        if names != [s.name for s in specs]:
            raise ModelError(
                f"{config_path}: inputs {names} do not match the transformer's conditioning inputs {[s.name for s in specs]}"
            )
        return cls(_read_tables(weights, n + 1, specs), n, neg)

    @classmethod
    def load_prompts(cls, path: Path, specs: list[TensorSpec]) -> ClassEmbeddings:
        """Read a prompt set (``--prompts FILE``): one safetensors file, ``[N + 1, ...]`` per input, the last row negative.

        Its metadata says ``{"format": "rstr.prompts/1"}``; ``tools/make_prompts.py`` writes one from a list
        of prompts with the model's own text encoders.  Image ``i`` of an evaluation then takes prompt ``i % N``.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta, sizes = f.metadata() or {}, {k: f.get_slice(k).get_shape() for k in f.keys()}
        except (OSError, SafetensorError) as err:
            raise ModelError(f"--prompts {path} is not a readable safetensors file ({err})") from None
        if meta.get("format") != PROMPTS_FORMAT:
            raise ModelError(
                f"--prompts {path}: metadata format {meta.get('format')!r} is not {PROMPTS_FORMAT!r}; "
                "write it with tools/make_prompts.py"
            )
        rows = {shape[0] for shape in sizes.values() if shape}
        if len(rows) != 1 or min(rows) < 2:
            raise ModelError(f"--prompts {path}: every tensor needs the same number (>= 2) of rows: prompts, then the negative")
        n = rows.pop() - 1
        return cls(_read_tables(path, n + 1, specs), n, n)


def _read_tables(path: Path, rows: int, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """One finite float32 ``[rows, *row_shape]`` tensor per conditioning input, checked against the specs' shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tables = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ModelError(f"{path} is not a readable safetensors file ({err})") from None
    names = [s.name for s in specs]
    if sorted(tables) != sorted(names):
        raise ModelError(f"{path} holds {sorted(tables)}, expected the conditioning inputs {sorted(names)}")
    for spec in specs:
        t, want = tables[spec.name], (rows, *spec.concrete(1)[1:])
        if t.dtype != torch.float32 or tuple(t.shape) != want or not torch.isfinite(t).all():
            raise ModelError(f"{path}: {spec.name} must be finite float32 {list(want)}, got {t.dtype} {list(t.shape)}")
    return {n: tables[n] for n in names}
