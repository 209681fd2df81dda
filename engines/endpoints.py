"""The manifest's sections at the two ends of the plan: how prompts or class labels become conditioning
(``text``, ``classes``) and how final latents become images (``decoder``).  Frozen dataclasses with
``to_json()`` and ``from_json()``, read by :class:`rstr.engines.manifest.Manifest` after validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


def omit_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class Decoder:
    """How latents become ``size x size x channels`` images with values in ``range``.

    ``pixels``: the latents are the image, ``(x - lo) / (hi - lo)`` clipped to [0, 1];
    ``vae``: the bundle graph ``graph`` (``vae_decoder``) maps the final latents to images in [0, 1].
    """

    kind: str
    channels: int
    size: int
    range: tuple[float, float]
    graph: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "channels": self.channels, "size": self.size, "range": list(self.range)}
        return omit_none({**out, "graph": self.graph})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Decoder:
        return cls(d["kind"], d["channels"], d["size"], tuple(d["range"]), d.get("graph"))


@dataclass(frozen=True)
class TextEncoderDesc:
    """One text encoder: its graph, tokenizer file, how prompts are tokenized, and the conditioning input it fills."""

    graph: str
    tokenizer: str  # a tokenizers-package JSON file inside the bundle
    max_length: int  # prompts are padded (with pad_id / pad_token) and truncated to this many tokens
    pad_id: int
    pad_token: str
    output: str  # the conditioning input its embeddings fill
    preprocess: str = "none"  # "lower-strip": the prompt is lower-cased and stripped first
    mask: str | None = None  # the conditioning input the attention mask fills (it is also the graph's attention_mask)

    def to_json(self) -> dict[str, Any]:
        return omit_none(asdict(self))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEncoderDesc:
        return cls(**d)  # the schema allows these keys only


@dataclass(frozen=True)
class Text:
    """Prompts in: the text encoders, run in order, and the negative prompt of guided steps by default."""

    encoders: tuple[TextEncoderDesc, ...]
    negative_prompt: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"encoders": [e.to_json() for e in self.encoders], "negative_prompt": self.negative_prompt}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Text:
        return cls(tuple(TextEncoderDesc.from_json(e) for e in d["encoders"]), d["negative_prompt"])


@dataclass(frozen=True)
class Classes:
    """Class labels in: ``graph`` maps ``class_labels [N]`` to every conditioning input; row ``negative_row`` is the
    empty prompt, the guided steps' unconditional input."""

    graph: str
    num_classes: int
    negative_row: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Classes:
        return cls(**d)  # the schema allows these keys only
