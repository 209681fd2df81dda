"""Stage-2 adapters: their content hash, the check that one fits a model, loading and the verified merge."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from torch import nn

from rstr._io import read_json
from rstr.engines.schema import json_type
from rstr.errors import RstrError
from rstr.families.base import Family

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_sha256(directory: str | os.PathLike[str]) -> str:
    """Content hash of the adapter's config and weights (what :func:`apply_adapter` merges)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode() + b"\0")
        h.update((Path(directory) / name).read_bytes())
    return h.hexdigest()


def check_adapter(family: Family, directory: str | os.PathLike[str]) -> None:
    """Raise one :class:`RstrError` line unless the adapter in ``directory`` fits ``family``'s model."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise RstrError(f"adapter directory {directory} does not exist; write one with `rstr calibrate --out {directory}`")
    missing = [n for n in ADAPTER_FILES if not (directory / n).is_file()]
    if missing:
        raise RstrError(f"{directory} is not a peft adapter directory (missing {', '.join(missing)})")
    config = _json_object(directory / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise RstrError(f"{directory}: adapter type {config.get('peft_type')!r} is not a LoRA; rstr merges LoRA adapters only")
    record = directory / "allocation.json"
    if record.is_file():
        alloc = _json_object(record)
        if (alloc.get("family"), alloc.get("transformer")) != (family.name, type(family.transformer).__name__):
            raise RstrError(
                f"{directory} was calibrated for a {alloc.get('family')} {alloc.get('transformer')}, "
                f"not this {family.name} {type(family.transformer).__name__}; calibrate this model"
            )
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    weights = directory / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])\.weight", key)
                if m is None:
                    raise RstrError(f"{directory}: unexpected tensor {key} in the adapter; only LoRA A/B weights are supported")
                shapes.setdefault(m.group(1), {})[m.group(2)] = tuple(f.get_slice(key).get_shape())
    except (OSError, SafetensorError) as err:
        raise RstrError(f"{weights} is not a readable safetensors file ({_first_line(err)}); write the adapter again") from None
    problems = []
    for name, ab in sorted(shapes.items()):
        try:
            layer = family.transformer.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name} is not in this model")
            continue
        if not isinstance(layer, nn.Linear):
            problems.append(f"module {name} is a {type(layer).__name__}, not a Linear")
            continue
        a, b = ab.get("lora_A", (0, 0)), ab.get("lora_B", (0, 0))
        if a[1] != layer.in_features or b[0] != layer.out_features or a[0] != b[1]:
            problems.append(
                f"{name} has LoRA A{list(a)} B{list(b)} but the model's layer is Linear({layer.in_features}, {layer.out_features})"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RstrError(f"adapter {directory} does not fit this model: {problems[0]}{more}")


def load_adapter(family: Family, directory: str | os.PathLike[str]):
    """Attach the adapter (unmerged) to ``family.transformer`` in place and return the ``PeftModel``.

    ``family`` then runs with the adapter; pass the result to :func:`merge_adapter` to fold it in.
    What peft refuses (target modules the model lacks, a config of the wrong types) is one error line.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    check_adapter(family, directory)
    try:
        return PeftModel.from_pretrained(family.transformer, str(directory), is_trainable=False)
    except (ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:
        raise RstrError(f"adapter {directory} does not fit this model ({_first_line(err)}); calibrate this model") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _json_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise RstrError(f"{path} must hold a JSON object, not {json_type(data)}")
    return data


def merge_adapter(peft_model) -> nn.Module:
    """Fold the LoRA into the base weights (``W + (alpha/r) B A``) and return the plain transformer."""
    return peft_model.merge_and_unload()


def apply_adapter(family: Family, directory: str | os.PathLike[str]) -> None:
    """Load the adapter in ``directory`` and merge it into ``family``'s transformer."""
    family.transformer = merge_adapter(load_adapter(family, directory)).eval()
