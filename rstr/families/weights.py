"""Load a diffusers model in a chosen dtype, one tensor at a time.

``from_pretrained(torch_dtype=...)`` reads a whole checkpoint file into memory in its stored
dtype before casting, and the file's memory-mapped pages count as resident while it is open:
loading DiT-XL/2's 2.7 GB of fp32 weights as fp16 peaks near 2x the file plus the model.
Here the model is built without weights (``accelerate.init_empty_weights``), each tensor is
read from its safetensors file, cast and put in place, and the file is reopened per tensor so
that its mapped pages leave the resident set: the peak is the model in the target dtype plus
one tensor.  Checkpoints that are not safetensors, or whose names need diffusers' legacy
conversions, are loaded by diffusers itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("rstr")


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as they are held now."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def weight_files(directory: Path, stem: str, variant: str | None = None) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of ``stem`` (``diffusion_pytorch_model``) in ``directory``, sharded or not.

    ``None`` when the directory holds no safetensors checkpoint of that name (and variant).
    """
    from safetensors import safe_open

    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    index = directory / f"{name}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {k: directory / v for k, v in weight_map.items()}
    single = directory / name
    if not single.is_file():
        return None
    with safe_open(single, "pt") as fh:
        return {k: single for k in fh.keys()}


def load_streamed(cls: Any, directory: Path, dtype: torch.dtype, variant: str | None = None) -> nn.Module:
    """``cls.from_pretrained(directory, torch_dtype=dtype)`` (``cls`` a diffusers model class) with a peak of the model
    plus one tensor."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    files = weight_files(directory, "diffusion_pytorch_model", variant)
    with init_empty_weights():
        model = cls.from_config(cls.load_config(directory))
    if files is None or set(files) != set(model.state_dict()):
        log.debug(f"{directory}: loaded by diffusers (not a safetensors checkpoint with the model's tensor names)")
        return cls.from_pretrained(directory, torch_dtype=dtype, variant=variant, use_safetensors=True).eval()
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, path in files.items():
        with safe_open(path, "pt") as fh:  # reopened per tensor: the mapped pages leave the resident set on close
            tensor = fh.get_tensor(name)
        target = (torch.float32 if any(k in name.split(".") for k in keep) else dtype) if tensor.is_floating_point() else None
        set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=target)
    return model.eval()
