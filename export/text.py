"""Text encoder graphs and tokenizers: bundles that take prompts.

For each of the family's text encoders (:mod:`rstr.families.text`) the bundle holds a graph
named like the encoder's folder (``text_encoder``, ``text_encoder_2``) taking ``input_ids
[N, L]`` int64 (and ``attention_mask [N, L]`` int64 where the family passes it) and returning
``embeddings`` float32 (``[N, L, D]``, or ``[N, D]`` for CLIP's pooled output), and the
tokenizer as ``tokenizers/<folder>.json`` for the ``tokenizers`` package.  The manifest's
``text`` section says how a runtime tokenizes (length, padding token, prompt preparation) and
which conditioning input each output fills, so ``Pipeline(prompt=...)`` needs no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rstr.export.graphs import export_graph
from torch import nn

from rstr.families.base import Family, TensorSpec
from rstr.families.text import TextEncoder

TOKENIZERS = "tokenizers"
EXAMPLE_PROMPTS = ["A photo of a red fox in the snow", ""]  # the verification's prompts: one, and the empty negative


class TextEncoderGraph(nn.Module):
    """``(input_ids[, attention_mask]) -> embeddings``, float32 out, the encoder's dtype inside."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # registered so the exporter sees the weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.encode(input_ids, attention_mask)


def _inputs(encoder: TextEncoder) -> list[str]:
    return ["input_ids", "attention_mask"] if encoder.spec.mask is not None else ["input_ids"]


def export_text_encoders(family: Family, root: Path) -> None:
    """``<name>.onnx`` per text encoder (dynamic batch) and ``tokenizers/<name>.json`` per tokenizer."""
    (root / TOKENIZERS).mkdir(exist_ok=True)
    for encoder in family.text_encoders:
        tokens = encoder.tokenize(EXAMPLE_PROMPTS)
        names = _inputs(encoder)
        with torch.no_grad():
            export_graph(
                TextEncoderGraph(encoder).eval(),
                tuple(tokens[n] for n in names),
                root / f"{encoder.spec.name}.onnx",
                names,
                ["embeddings"],
                {n: "batch" for n in [*names, "embeddings"]},
                True,
            )
        encoder.tokenizer.backend_tokenizer.save(str(root / TOKENIZERS / f"{encoder.spec.name}.json"))


def text_graphs(family: Family) -> dict[str, dict]:
    """The manifest's ``graphs`` entries of the text encoders."""
    out = {}
    for encoder in family.text_encoders:
        spec = encoder.spec
        ids = [TensorSpec(n, torch.int64, ("batch", encoder.max_length)) for n in _inputs(encoder)]
        embeddings = TensorSpec("embeddings", torch.float32, ("batch", *_output_dim(family, spec.cond)))
        out[spec.name] = {
            "file": f"{spec.name}.onnx",
            "inputs": [t.to_json() for t in ids],
            "outputs": [embeddings.to_json()],
        }
    return out


def _output_dim(family: Family, cond: str) -> tuple[int, ...]:
    """The per-row shape of the conditioning input an encoder fills (its graph's output)."""
    spec = next(s for s in family.cond_specs() if s.name == cond)
    return tuple(int(d) for d in spec.shape[1:])


def text_section(family: Family) -> dict | None:
    """The manifest's ``text``: per encoder its graph, tokenizer file, length, padding and what it fills."""
    if not family.text_encoders:
        return None
    encoders = []
    for encoder in family.text_encoders:
        spec, tok = encoder.spec, encoder.tokenizer
        entry = {
            "graph": spec.name,
            "tokenizer": f"{TOKENIZERS}/{spec.name}.json",
            "max_length": encoder.max_length,
            "pad_id": int(tok.pad_token_id),
            "pad_token": str(tok.pad_token),
            "output": spec.cond,
            "preprocess": spec.preprocess,
        }
        if spec.mask is not None:
            entry["mask"] = spec.mask
        encoders.append(entry)
    return {"encoders": encoders, "negative_prompt": ""}


def text_reference(family: Family) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """Per encoder: the example prompts' token arrays and the PyTorch encoder's output on them."""
    out = {}
    for encoder in family.text_encoders:
        tokens = encoder.tokenize(EXAMPLE_PROMPTS)
        names = _inputs(encoder)
        with torch.no_grad():
            embeddings = encoder.encode(*(tokens[n] for n in names))
        out[encoder.spec.name] = ({n: tokens[n].numpy() for n in names}, embeddings.numpy())
    return out
