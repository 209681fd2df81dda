"""Prompts to conditioning: a bundle's tokenizers (the ``tokenizers`` package) and text encoder graphs, or its class table.

A bundle with a ``text`` section (docs/bundle.md) holds, per encoder, a tokenizer file and a
graph; :class:`PromptEncoder` tokenizes prompts the way the stock pipeline does (the
manifest's preparation, right padding with its pad token to ``max_length``, truncation),
runs the graphs with ONNX Runtime and returns the conditioning inputs they fill, as float32
arrays.  A bundle with a ``classes`` section takes class labels instead (:class:`ClassTable`: the
digits reference models' "text encoder", a table of prompt embeddings by class).  No torch, no
transformers.
"""

from __future__ import annotations

import numpy as np
from rstr.engines.base import InputError
from rstr.engines.bundle import Bundle, safe_member
from rstr.engines.endpoints import TextEncoderDesc

from rstr.errors import BundleError, RstrError


def _tokenizer(bundle: Bundle, desc: TextEncoderDesc):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RstrError("prompts need the tokenizers package; pip install tokenizers (part of rstr's runtime set)") from None
    path = safe_member(bundle.root, desc.tokenizer)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers package raises plain Exceptions for unreadable files
        raise BundleError(f"{desc.tokenizer}: not a tokenizer file the tokenizers package reads ({err})") from None
    tok.enable_truncation(max_length=desc.max_length)
    tok.enable_padding(length=desc.max_length, pad_id=desc.pad_id, pad_token=desc.pad_token, direction="right")
    return tok


class PromptEncoder:
    """The bundle's text encoders on ONNX Runtime: prompts in, conditioning arrays out."""

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        from rstr.engines.onnxruntime import open_session

        text = bundle.manifest.text
        if text is None:
            raise InputError("this bundle takes no prompts (it has no text encoders); pass conditioning arrays")
        self.negative_prompt = text.negative_prompt
        self.encoders = [(d, _tokenizer(bundle, d), open_session(bundle, d.graph, device)) for d in text.encoders]

    def tokenize(self, desc: TextEncoderDesc, tokenizer, prompts: list[str]) -> dict[str, np.ndarray]:
        prepared = [p.lower().strip() if desc.preprocess == "lower-strip" else p for p in prompts]
        encodings = tokenizer.encode_batch(prepared)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The conditioning inputs the encoders fill for ``prompts`` (one row each)."""
        out: dict[str, np.ndarray] = {}
        for desc, tokenizer, session in self.encoders:
            tokens = self.tokenize(desc, tokenizer, prompts)
            feeds = {i.name: tokens[i.name] for i in session.get_inputs()}
            out[desc.output] = session.run(["embeddings"], feeds)[0]
            if desc.mask is not None:
                out[desc.mask] = tokens["attention_mask"].astype(np.float32)
        return out


class ClassTable:
    """The bundle's class table graph on ONNX Runtime: class labels in, every conditioning input out."""

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        from rstr.engines.onnxruntime import open_session

        classes = bundle.manifest.classes
        if classes is None:
            raise InputError("this bundle has no class table; pass its conditioning inputs")
        self.classes, self.batch = classes, bundle.batch
        self.session = open_session(bundle, classes.graph, device)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, labels) -> dict[str, np.ndarray]:
        """The conditioning of class ``labels`` (B integers in 0..num_classes - 1)."""
        arr = np.asarray(labels)
        n = self.classes.num_classes
        if arr.shape != (self.batch,) or arr.dtype.kind not in "iu":
            raise InputError(
                f"class_labels must be one integer per row ({self.batch} for this bundle), got {arr.dtype} {list(arr.shape)}"
            )
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise InputError(f"class label {int(bad[0])} is out of range; this model has classes 0..{n - 1}")
        return self._rows(arr)

    def negative(self) -> dict[str, np.ndarray]:
        """The empty prompt's conditioning, B rows: the guided steps' unconditional input."""
        return self._rows(np.full(self.batch, self.classes.negative_row))

    def _rows(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {"class_labels": labels.astype(np.int64)})))
