"""rstr's outputs in diffusers' own formats: the adapter as a diffusers LoRA, the model as a pipeline directory.

* :func:`write_lora` / :func:`export_lora`: a Stage-2 adapter (peft: ``adapter_config.json`` +
  ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``) rewritten as
  diffusers' LoRA file (``pytorch_lora_weights.safetensors``, keys ``transformer.<module>...``,
  the peft config as ``lora_adapter_metadata``), which ``pipe.load_lora_weights(dir)`` loads on
  pipelines with a LoRA loader (FLUX, Qwen-Image).  DiT and PixArt-alpha pipelines have none in
  diffusers 0.42: use :func:`rstr.diffusers.apply` (``adapter=``) or :func:`export_pipeline`.
* :func:`export_pipeline` (``rstr export-diffusers``): the family's stock pipeline with the
  adapter fused into the transformer (``W + (alpha/r) B A``), the model's scheduler, and the
  schedule as ``guider/guider_config.json`` (:class:`~rstr.diffusers.ScheduledGuidance`),
  written to a temporary directory and renamed when complete.  A pipeline directory as input
  keeps its other components (VAE, text encoders); rstr's own layout (``transformer/``,
  ``scheduler/``, ``rstr.json``) gets none, except that a pixel-space DiT (``rstr.json`` has
  ``image``) gets a :class:`PixelDecoder`, since ``DiTPipeline`` always decodes.  ``rstr.json``
  and a class table (``class_embeddings/``) are copied, so rstr reads the output too.
  :func:`load_pipeline` loads such a directory and applies its schedule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin  # ModelMixin also lets diffusers find PixelDecoder's loader
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

from rstr._io import atomic_dir
from rstr.diffusers.guider import ScheduledGuidance
from rstr.diffusers.pipelines import apply
from rstr.errors import RstrError
from rstr.families import Family
from rstr.families.class_embeddings import DIRECTORY as CLASS_EMBEDDINGS_DIR
from rstr.schedule import GuidanceSchedule

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default for load_lora_weights
GUIDER_FOLDER = "guider"
# peft LoraConfig fields that decide the adapter's shapes and scaling; diffusers rebuilds the config from them
_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
)
_PEFT_KEY = re.compile(r"base_model\.model\.(.+\.lora_[AB]\.weight)")


class PixelDecoder(ModelMixin, ConfigMixin):
    """The "VAE" of a pixel-space model: maps samples from the model's pixel range ``[low, high]`` to ``[-1, 1]``.

    ``DiTPipeline`` always decodes through ``vae`` and then maps ``[-1, 1]`` to ``[0, 1]``; with this
    decoder a pixel-space DiT (the reference digits model) yields its images.  ``scale`` and
    ``shift`` are buffers so that the decoder saves, loads and moves like any diffusers model.
    """

    @register_to_config
    def __init__(self, low: float = -1.0, high: float = 1.0, scaling_factor: float = 1.0):
        super().__init__()
        if not high > low:
            raise RstrError(f"pixel range [{low}, {high}] is empty; give low < high")
        self.register_buffer("scale", torch.tensor(2.0 / (high - low)))
        self.register_buffer("shift", torch.tensor(-(high + low) / (high - low)))

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        x = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        return DecoderOutput(sample=x) if return_dict else (x,)


# ------------------------------------------------------------------------ LoRA
def write_lora(adapter: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """Write the adapter in ``adapter`` as diffusers' LoRA file into ``directory``; return the file's path."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from safetensors.torch import load_file

    from rstr.calibrate.adapter import ADAPTER_FILES

    adapter = Path(adapter)
    config_file, weights_file = (adapter / name for name in ADAPTER_FILES)
    config = json.loads(config_file.read_text())
    state = {}
    for key, value in load_file(str(weights_file)).items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise RstrError(f"{weights_file}: tensor {key} is not a LoRA A/B weight; only LoRA adapters convert")
        state[f"transformer.{m.group(1)}"] = value
    metadata = {f"transformer.{k}": config[k] for k in _LORA_FIELDS if k in config}
    LoraBaseMixin.write_lora_layers(
        state,
        str(directory),
        is_main_process=True,
        weight_name=LORA_WEIGHT_NAME,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=metadata,
    )
    return Path(directory) / LORA_WEIGHT_NAME


def export_lora(family: Family, adapter: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Path:
    """Check ``adapter`` against ``family``'s model and write it to ``out`` in diffusers' LoRA layout."""
    from rstr.calibrate import check_adapter

    check_adapter(family, adapter)
    out = Path(out)
    _check_out(out, force)
    with atomic_dir(out, force=force) as tmp:
        write_lora(adapter, tmp)
    return out / LORA_WEIGHT_NAME


# -------------------------------------------------------------------- pipeline
def export_pipeline(
    model: str | os.PathLike[str] | None,
    schedule: GuidanceSchedule,
    out: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a diffusers pipeline directory that runs ``schedule`` (adapter fused); return ``out``.

    ``model`` is what ``rstr`` commands take: a local directory, a reference model name (None:
    the digits DiT) or a Hub id in the local cache (:func:`rstr.hub.resolve_model`).  The output
    loads with ``DiffusionPipeline.from_pretrained(out)`` (import ``rstr.diffusers`` first when it
    holds a :class:`PixelDecoder`) and follows the schedule after :func:`load_pipeline` or
    ``rstr.diffusers.apply(pipe, ScheduledGuidance.from_pretrained(out, subfolder="guider"))``.
    """
    from rstr.families import load_model
    from rstr.hub import is_hub_id, resolve_model

    family = load_model(resolve_model(model) if model is not None and is_hub_id(model) else model)
    schedule.check_fits(family.name, family.sampler)
    out = Path(out)
    _check_out(out, force)
    if adapter is not None:
        from rstr.calibrate import apply_adapter

        apply_adapter(family, adapter)
    pipe = _stock_pipeline(family)
    with atomic_dir(out, force=force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        ScheduledGuidance.from_schedule(schedule).save_pretrained(tmp / GUIDER_FOLDER)
        for name in ("rstr.json", CLASS_EMBEDDINGS_DIR):  # rstr's facts about the model: rstr commands read the directory too
            source = family.path / name if family.path is not None else None
            if source is not None and source.is_file():
                shutil.copyfile(source, tmp / name)
            elif source is not None and source.is_dir():
                shutil.copytree(source, tmp / name)
    return out


def load_pipeline(directory: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load a directory written by :func:`export_pipeline` and apply its schedule (``kwargs`` go to ``from_pretrained``)."""
    directory = Path(directory)
    if not (directory / GUIDER_FOLDER / ScheduledGuidance.config_name).is_file():
        raise RstrError(
            f"{directory} has no {GUIDER_FOLDER}/{ScheduledGuidance.config_name}; write it with `rstr export-diffusers --out {directory}`"
        )
    pipe = DiffusionPipeline.from_pretrained(directory, **kwargs)
    apply(pipe, ScheduledGuidance.from_pretrained(directory, subfolder=GUIDER_FOLDER))
    return pipe


def _stock_pipeline(family: Family) -> Any:
    """The family's stock pipeline around its (possibly calibrated) transformer and its scheduler."""
    import diffusers

    components = {"transformer": family.transformer, "scheduler": family.scheduler}
    if family.path is not None and (family.path / "model_index.json").is_file():
        return DiffusionPipeline.from_pretrained(family.path, **components)
    cls = getattr(diffusers, family.pipeline_classes[0])
    modules, _ = cls._get_signature_keys(cls)
    components.update({name: None for name in modules if name not in components})
    if "vae" in components and family.image is not None:
        components["vae"] = PixelDecoder(low=family.image.range[0], high=family.image.range[1])
    return cls(**components)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise RstrError(f"{out} already exists; pass --force to replace it or choose another --out")
