"""Model families and the loader that picks one from a local diffusers directory.

A model is a path or the name of a reference model shipped with rstr (``digits-dit``, the
default; ``digits-pixart``, ``digits-flux``, ``digits-qwenimage`` where present).  Accepted
layouts (nothing is ever fetched from a hub):

* a pipeline directory (``model_index.json`` with ``transformer/`` and ``scheduler/``);
* a directory with ``transformer/`` and ``scheduler/`` but no ``model_index.json``
  (how rstr ships its reference model, with an ``rstr.json`` beside them);
* a transformer directory (``config.json`` naming a supported transformer class); the
  family's default scheduler is used.

Beside them, ``rstr.json`` holds rstr's facts about the model (default steps and scale, the
digits classifier and image layout of the reference models) and ``class_embeddings/`` the
class table of text-conditioned reference models (:mod:`rstr.families.class_embeddings`).
Families outside this package join with :func:`register_family`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from rstr._io import read_json
from rstr.engines.schema import json_type
from rstr.errors import ModelError
from rstr.families.base import Conditioning, Family, ImageSpec, TensorSpec
from rstr.families.class_embeddings import DIRECTORY as CLASS_EMBEDDINGS_DIR
from rstr.families.class_embeddings import ClassEmbeddings
from rstr.families.dit import DiTFamily
from rstr.families.flux import FluxFamily
from rstr.families.pixart import PixArtFamily
from rstr.families.qwenimage import QwenImageFamily
from rstr.families.size import set_size
from rstr.families.text import load_text_encoders
from rstr.families.weights import load_streamed

FAMILIES: dict[str, type[Family]] = {}
# The transformer dtypes a command can load (--dtype), by the names rstr uses everywhere (the bundle's dtype too).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_MODELS = Path(__file__).resolve().parent.parent / "reference"
REFERENCE_MODEL = REFERENCE_MODELS / "digits-dit"

__all__ = [
    "DTYPES",
    "FAMILIES",
    "REFERENCE_MODEL",
    "Conditioning",
    "Family",
    "ImageSpec",
    "TensorSpec",
    "dtype_name",
    "family_for_transformer",
    "load_model",
    "model_sha256",
    "register_family",
    "resolve_model_path",
    "torch_dtype",
]


def register_family(family: type[Family]) -> type[Family]:
    """Make ``load_model`` recognise ``family``'s transformer and pipeline classes (usable as a decorator)."""
    for other in FAMILIES.values():
        if other is not family and (other.name == family.name or other.transformer_class == family.transformer_class):
            raise ValueError(f"family {family.name} ({family.transformer_class}) clashes with {other.name}")
    FAMILIES[family.name] = family
    return family


for _family in (DiTFamily, PixArtFamily, FluxFamily, QwenImageFamily):
    register_family(_family)


def _read_json(path: Path, infinities: bool = False) -> dict:
    data = read_json(path, ModelError, infinities)
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object, not {json_type(data)}")
    return data


@contextlib.contextmanager
def _diffusers_quiet() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def _load_scheduler(directory: Path, family: type[Family]):
    import diffusers
    from diffusers import SchedulerMixin

    config_path = directory / "scheduler_config.json"
    if not config_path.is_file():
        return family.default_scheduler()
    config = _read_json(config_path, infinities=True)  # DPMSolverMultistepScheduler saves lambda_min_clipped = -inf
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelError(f"{config_path}: {config.get('_class_name')!r} is not a diffusers scheduler class")
    try:
        return cast(Any, cls).from_config(config)  # a diffusers class: untyped here (pyproject.toml)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{config_path}: cannot build the scheduler ({err})") from None


def _load_vae(directory: Path, family: type[Family], dtype: torch.dtype, variant: str | None) -> torch.nn.Module | None:
    """The pipeline's VAE (``family.vae_class``) in ``dtype``; a broken config or weights is one ModelError line.

    None for the :class:`~rstr.diffusers.PixelDecoder` that ``rstr export-diffusers`` writes for pixel
    models: their latents are the image (``rstr.json``'s ``image``), nothing to decode.
    """
    import diffusers

    from rstr.diffusers.export import PixelDecoder

    config = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    if config.get("_class_name") == PixelDecoder.__name__:
        return None
    if config.get("_class_name") != family.vae_class:
        raise ModelError(
            f"{directory}/config.json: VAE class {config.get('_class_name')!r} is not the {family.name} family's "
            f"{family.vae_class}; give the pipeline's own vae/ (or remove it to build without a decoder)"
        )
    return _load_weights(getattr(diffusers, family.vae_class), directory, dtype, variant, "VAE")


def _load_weights(
    cls: type[torch.nn.Module], directory: Path, dtype: torch.dtype, variant: str | None, what: str = "weights"
) -> torch.nn.Module:
    """A diffusers model of ``directory`` in ``dtype`` from safetensors weights only; any failure is one ModelError line."""
    if not any(directory.glob("*.safetensors")) and any(directory.glob("*.bin")):
        raise ModelError(
            f"{directory} has pickled .bin weights only; rstr loads safetensors weights (unpickling can run code): "
            "convert them with safetensors.torch.save_file"
        )
    try:
        with _diffusers_quiet():  # its notes on missing weights become the one error line below
            model = load_streamed(cls, directory, dtype, variant)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{directory}: cannot load the {what} ({first})") from None
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(
            f"{directory}: the weights lack {len(missing)} tensor(s) its config.json asks for (e.g. {missing[0]}); "
            "the config does not match the weights"
        )
    return model


def family_for_transformer(transformer: torch.nn.Module) -> type[Family]:
    name = type(transformer).__name__
    for family in FAMILIES.values():
        if family.transformer_class == name:
            return family
    raise ModelError(
        f"transformer class {name} is not supported; supported: {', '.join(sorted(f.transformer_class for f in FAMILIES.values()))}"
    )


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for ``fp32`` / ``fp16`` / ``bf16`` (or one of those torch dtypes)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``fp16`` / ``bf16`` for a torch dtype (the inverse of :func:`torch_dtype`)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_model_path(model: str | os.PathLike[str] | None, revision: str | None = None, variant: str | None = None) -> Path:
    """A model directory from a path, a reference model shipped with rstr (``digits-flux``), or a Hub id in the local cache."""
    if model is None:
        return REFERENCE_MODEL
    path = Path(model)
    if not path.exists() and len(path.parts) == 1 and (REFERENCE_MODELS / path.name).is_dir():
        return REFERENCE_MODELS / path.name
    from rstr.hub import is_hub_id, resolve_model

    if path.exists() or is_hub_id(model) or revision is not None or variant is not None:
        return resolve_model(model, revision=revision, variant=variant)
    return path


def _model_files(path: Path) -> list[Path]:
    """The files :func:`load_model` reads from the model directory ``path`` (hidden files aside)."""
    transformer = path / "transformer" if (path / "transformer").is_dir() else path
    files = [f for f in (path / "rstr.json", path / "model_index.json") if f.is_file()]
    files += [f for f in transformer.iterdir() if f.is_file()]
    pipeline = [path / "vae", *path.glob("text_encoder*"), *path.glob("tokenizer*")]  # graphs and files of the bundle
    for sub in (path / "scheduler", path / CLASS_EMBEDDINGS_DIR, *pipeline):
        if sub.is_dir():
            files += [f for f in sub.rglob("*") if f.is_file()]
    return sorted({f for f in files if not f.name.startswith(".")})


def model_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of the files of the model directory ``path`` that :func:`load_model` reads (names, sizes, bytes).

    ``rstr-export build`` records it as the bundle's ``provenance.model_sha256``; ``rstr-export verify``
    loads the recorded model only when its files still hash to it.
    """
    path = Path(path)
    h = hashlib.sha256()
    for f in _model_files(path):
        h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    variant: str | None = None,
    prompts: str | os.PathLike[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    max_text_len: int | None = None,
    **family_kwargs,
) -> Family:
    """Load a family adapter from a local diffusers directory, a reference model name or a cached Hub id.

    The default is the reference digits DiT; the transformer (and the pipeline's VAE and text
    encoders, when the directory has them) is loaded in ``dtype`` (``fp32``, ``fp16`` or ``bf16``),
    one tensor at a time (:mod:`rstr.families.weights`), and moved to ``device``; ``revision`` picks
    a Hub id's cached snapshot and ``variant`` (e.g. ``fp16``) the weight files to load.  ``prompts``
    (a prompt set file) replaces the model's class table as the conditioning drawn for evaluation,
    search and calibration.  ``height``, ``width`` and ``max_text_len`` override the model's output
    size and prompt length where it allows (:mod:`rstr.families.size`).
    """
    import diffusers

    weights_dtype = torch_dtype(dtype)
    path = resolve_model_path(path, revision, variant)
    if not path.exists():
        names = ", ".join(sorted(p.name for p in REFERENCE_MODELS.iterdir() if p.is_dir()))
        raise ModelError(f"model path {path} does not exist; give a local diffusers directory or a reference model ({names})")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a directory; give a diffusers pipeline or transformer directory")
    path = path.resolve()

    meta = _read_json(path / "rstr.json") if (path / "rstr.json").is_file() else {}
    if (path / "transformer").is_dir():
        transformer_dir, scheduler_dir = path / "transformer", path / "scheduler"
        if (path / "model_index.json").is_file():
            pipe_cls = _read_json(path / "model_index.json").get("_class_name")
            known = sorted(p for f in FAMILIES.values() for p in f.pipeline_classes)
            if pipe_cls not in known:
                raise ModelError(f"{path}: pipeline {pipe_cls!r} is not supported; supported: {', '.join(known)}")
    elif (path / "config.json").is_file():
        transformer_dir, scheduler_dir = path, path / "scheduler"
    else:
        raise ModelError(f"{path} is not a diffusers model directory (no transformer/ or config.json)")

    config = _read_json(transformer_dir / "config.json") if (transformer_dir / "config.json").is_file() else {}
    family = next((f for f in FAMILIES.values() if f.transformer_class == config.get("_class_name")), None)
    if family is None:
        raise ModelError(
            f"{transformer_dir}: transformer {config.get('_class_name')!r} is not supported; "
            f"supported: {', '.join(sorted(f.transformer_class for f in FAMILIES.values()))}"
        )
    transformer = _load_weights(getattr(diffusers, family.transformer_class), transformer_dir, weights_dtype, variant)
    vae = _load_vae(path / "vae", family, weights_dtype, variant) if (path / "vae").is_dir() else None
    scheduler = _load_scheduler(scheduler_dir if scheduler_dir.is_dir() else path, family)
    default_steps = meta.get("default_steps")
    if "default_steps" in meta and (isinstance(default_steps, bool) or not isinstance(default_steps, int) or default_steps < 1):
        raise ModelError(f"{path}/rstr.json: default_steps {default_steps!r} must be an integer >= 1 (or leave it out)")
    adapter = family(transformer.to(device), scheduler, default_steps=default_steps, meta=meta, path=path, **family_kwargs)
    adapter.vae = None if vae is None else vae.to(device)
    set_size(adapter, height, width, max_text_len)  # before the text encoders: their token length follows it
    adapter.text_encoders = load_text_encoders(path, adapter.text_encoder_specs(), weights_dtype)
    for encoder in adapter.text_encoders:
        encoder.model.to(device)
    table = path / CLASS_EMBEDDINGS_DIR
    if prompts is not None:
        adapter.prompts = Path(prompts).resolve()
        adapter.class_embeddings = ClassEmbeddings.load_prompts(adapter.prompts, adapter.cond_specs())
    elif table.is_dir():
        adapter.class_embeddings = ClassEmbeddings.load(table, adapter.cond_specs())
    return adapter
