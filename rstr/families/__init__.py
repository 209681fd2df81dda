"""Model families and the loader that picks one from a local diffusers directory.

Accepted layouts (nothing is ever fetched from a hub):

* a pipeline directory (``model_index.json`` with ``transformer/`` and ``scheduler/``);
* a directory with ``transformer/`` and ``scheduler/`` but no ``model_index.json``
  (how rstr ships its reference model, with an ``rstr.json`` beside them);
* a transformer directory (``config.json`` naming a supported transformer class); the
  family's default scheduler is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rstr.errors import ModelError
from rstr.families.base import Conditioning, Family, TensorSpec
from rstr.families.dit import DiTFamily
from rstr.families.flux import FluxFamily
from rstr.families.pixart import PixArtFamily
from rstr.families.qwenimage import QwenImageFamily

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (DiTFamily, PixArtFamily, FluxFamily, QwenImageFamily)}
_BY_TRANSFORMER = {f.transformer_class: f for f in FAMILIES.values()}
_BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}
_BY_PIPELINE["PixArtSigmaPipeline"] = PixArtFamily

REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "reference" / "digits-dit"

__all__ = ["FAMILIES", "REFERENCE_MODEL", "Conditioning", "Family", "TensorSpec", "load_model", "family_for_transformer"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not a readable JSON file ({err})") from None


def _default_scheduler(family: type[Family]):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family in (DiTFamily, PixArtFamily):
        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def _load_scheduler(directory: Path, family: type[Family]):
    from diffusers import SchedulerMixin  # noqa: F401  (imported for the side effect of registering classes)
    import diffusers

    config_path = directory / "scheduler_config.json"
    if not config_path.is_file():
        return _default_scheduler(family)
    config = _read_json(config_path)
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ModelError(f"{config_path}: unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_config(config)


def family_for_transformer(transformer: torch.nn.Module) -> type[Family]:
    name = type(transformer).__name__
    if name not in _BY_TRANSFORMER:
        raise ModelError(f"transformer class {name} is not supported; supported: {', '.join(sorted(_BY_TRANSFORMER))}")
    return _BY_TRANSFORMER[name]


def load_model(path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu", **family_kwargs) -> Family:
    """Load a family adapter from a local diffusers directory (default: the reference model)."""
    import diffusers

    path = Path(path) if path is not None else REFERENCE_MODEL
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; give a local diffusers directory")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a directory; give a diffusers pipeline or transformer directory")

    meta = _read_json(path / "rstr.json") if (path / "rstr.json").is_file() else {}
    if (path / "transformer").is_dir():
        transformer_dir, scheduler_dir = path / "transformer", path / "scheduler"
        if (path / "model_index.json").is_file():
            index = _read_json(path / "model_index.json")
            pipe_cls = index.get("_class_name")
            if pipe_cls not in _BY_PIPELINE:
                raise ModelError(f"{path}: pipeline {pipe_cls!r} is not supported; supported: {', '.join(sorted(_BY_PIPELINE))}")
    elif (path / "config.json").is_file():
        transformer_dir, scheduler_dir = path, path / "scheduler"
    else:
        raise ModelError(f"{path} is not a diffusers model directory (no transformer/ or config.json)")

    config = _read_json(transformer_dir / "config.json") if (transformer_dir / "config.json").is_file() else {}
    family = _BY_TRANSFORMER.get(config.get("_class_name", ""))
    if family is None:
        raise ModelError(
            f"{transformer_dir}: transformer {config.get('_class_name')!r} is not supported; "
            f"supported: {', '.join(sorted(_BY_TRANSFORMER))}"
        )
    try:
        transformer = getattr(diffusers, family.transformer_class).from_pretrained(transformer_dir, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{transformer_dir}: cannot load the weights ({first})") from None
    scheduler = _load_scheduler(scheduler_dir if scheduler_dir.is_dir() else path, family)
    adapter = family(transformer.to(device), scheduler, default_steps=meta.get("default_steps"), meta=meta, **family_kwargs)
    adapter.path = path
    return adapter
