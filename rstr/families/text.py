"""Text encoders of a pipeline directory: what a family says about turning prompts into its conditioning.

A family lists its encoders (:meth:`rstr.families.base.Family.text_encoder_specs`): which
component folder holds the encoder and which its tokenizer, the token length, which output
is used (the last hidden state or CLIP's pooled output), which conditioning input it fills,
whether the tokenizer's attention mask is passed to the encoder and becomes a conditioning
input too, and how the prompt is prepared before tokenizing.  :func:`load_text_encoders`
reads them (transformers classes, in the build dtype) when the directory has them; the export
turns each into a graph taking token ids (:mod:`rstr.export.text`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rstr.errors import ModelError

Preprocess = Literal["none", "lower-strip"]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a pipeline, as its stock pipeline uses it."""

    name: str  # the component folder of the encoder (text_encoder, text_encoder_2) and the graph's name
    tokenizer: str  # the component folder of its tokenizer
    max_length: int | None  # tokens: prompts are padded and truncated to it (None: the tokenizer's model_max_length)
    output: Literal["last_hidden_state", "pooler_output"]
    cond: str  # the conditioning input it fills
    mask: str | None = None  # the conditioning input that gets the attention mask (also passed to the encoder)
    preprocess: Preprocess = "none"  # what the stock pipeline does to a prompt before tokenizing it

    def prepare(self, prompt: str) -> str:
        return prompt.lower().strip() if self.preprocess == "lower-strip" else prompt


@dataclass
class TextEncoder:
    """A loaded encoder with its tokenizer (a transformers fast tokenizer) and its spec."""

    spec: TextEncoderSpec
    model: nn.Module
    tokenizer: Any  # a transformers fast tokenizer (untyped here)

    @property
    def max_length(self) -> int:
        """Tokens per prompt (the spec's, or the tokenizer's ``model_max_length`` filled in at load)."""
        if self.spec.max_length is None:
            raise RuntimeError(f"text encoder {self.spec.name} was built without load_text_encoders (no max_length)")
        return self.spec.max_length

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` (and ``attention_mask``) ``[N, max_length]`` int64, as the stock pipeline tokenizes."""
        out = self.tokenizer(
            [self.spec.prepare(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The spec's output for token ids, float32 (the mask is passed only when the spec says so)."""
        kwargs = {"attention_mask": attention_mask} if self.spec.mask is not None else {}
        out = self.model(input_ids, output_hidden_states=False, **kwargs)
        return getattr(out, self.spec.output).float()


def load_text_encoders(path: Path, specs: list[TextEncoderSpec], dtype: torch.dtype) -> list[TextEncoder]:
    """The encoders of ``specs`` whose folders ``path`` has (all or none); a broken one is one ModelError line."""
    present = [s for s in specs if (path / s.name).is_dir()]
    if not present:
        return []
    if len(present) != len(specs):
        missing = [s.name for s in specs if s not in present]
        raise ModelError(f"{path}: has {present[0].name}/ but not {', '.join(missing)}/; give every text encoder or none")
    return [_load(path, spec, dtype) for spec in specs]


def _load(path: Path, spec: TextEncoderSpec, dtype: torch.dtype) -> TextEncoder:
    import transformers
    from huggingface_hub import errors as hub_errors

    # transformers 5's typed configs refuse a mistyped field with huggingface_hub's StrictDataclassError (hub >= 0.32)
    strict_config_error = getattr(hub_errors, "StrictDataclassError", ValueError)

    directory = path / spec.name
    try:
        config = json.loads((directory / "config.json").read_text())
        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, str(arch), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"architectures names {arch!r}, not a transformers model class")
        model = cls.from_pretrained(directory, torch_dtype=dtype, use_safetensors=True).eval()  # never unpickle
        tokenizer = transformers.AutoTokenizer.from_pretrained(path / spec.tokenizer, use_fast=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, strict_config_error) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{directory}: cannot load the text encoder or its tokenizer ({first})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{path / spec.tokenizer}: no fast tokenizer (tokenizer.json) can be made; the bundle needs one")
    if tokenizer.padding_side != "right" or tokenizer.truncation_side != "right":
        raise ModelError(f"{path / spec.tokenizer}: pads or truncates on the left; bundles tokenize on the right only")
    if spec.max_length is None:
        spec = replace(spec, max_length=int(tokenizer.model_max_length))
    return TextEncoder(spec, model, tokenizer)
