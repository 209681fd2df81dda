"""A class-indexed table of conditioning tensors: the "text encoder" of rstr's text-conditioned reference models.

The digits reference models of the text families (PixArt-alpha, FLUX, Qwen-Image) take prompt
embeddings like their full-size counterparts; their "prompt" for class ``k`` is a fixed row of
this table, and the negative (empty) prompt is the row ``negative_row``.  On disk, beside the
transformer::

    class_embeddings/config.json              {"format": "rstr.class-embeddings/1", "num_classes": 10,
                                               "negative_row": 10, "inputs": [names...]}
    class_embeddings/embeddings.safetensors   one float32 tensor per conditioning input,
                                              [num_classes + 1, *row_shape]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rstr.errors import ModelError

FORMAT = "rstr.class-embeddings/1"
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
    def load(cls, directory: Path, inputs: list[str]) -> ClassEmbeddings:
        """Read and check a table for a denoiser whose conditioning inputs are ``inputs``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path, weights = directory / "config.json", directory / "embeddings.safetensors"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise ModelError(f"{config_path} is not a readable JSON file ({err})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ModelError(f"{config_path}: expected a JSON object with format {FORMAT!r}")
        n, neg, names = config.get("num_classes"), config.get("negative_row"), config.get("inputs")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(neg, int) or not 0 <= neg <= n:
            raise ModelError(f"{config_path}: num_classes must be an integer >= 1 and negative_row in [0, num_classes]")
        if names != inputs:
            raise ModelError(f"{config_path}: inputs {names} do not match the transformer's conditioning inputs {inputs}")
        try:
            tables = load_file(str(weights))
        except (OSError, SafetensorError) as err:
            raise ModelError(f"{weights} is not a readable safetensors file ({err})") from None
        if sorted(tables) != sorted(inputs):
            raise ModelError(f"{weights} holds {sorted(tables)}, expected {sorted(inputs)}")
        for name, t in tables.items():
            if t.dtype != torch.float32 or t.ndim < 1 or t.shape[0] != n + 1 or not torch.isfinite(t).all():
                raise ModelError(f"{weights}: {name} must be finite float32 [{n + 1}, ...], got {t.dtype} {list(t.shape)}")
        return cls({k: tables[k] for k in inputs}, n, neg)
