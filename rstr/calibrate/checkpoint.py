"""Stage-2 checkpoints without pickle: tensors in a safetensors file, everything else as JSON in its header.

The checkpoint of a calibration into ``out`` is the hidden sibling ``.<out>.checkpoint.safetensors``.
Its tensors are the calibration data, the LoRA weights and the optimizer's moments; the header key
``rstr`` holds one JSON document with the settings, the progress, the sensitivity and ranks, the
optimizer's and scheduler's settings and the generator state (a list of bytes).  Reading parses
the header without running code, checks the document's shape before any value is used, and turns
every problem into one :class:`RstrError` line; the old pickled ``.checkpoint.pt`` is never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rstr._io import atomic_path
from rstr.calibrate.allocation import RANKS
from rstr.calibrate.train import CalibrationData
from rstr.errors import RstrError

CHECKPOINT_FORMAT = "rstr.calibration-checkpoint/1"
_HEADER_KEY = "rstr"
_PARTS = ("pool", "validation")  # the CalibrationData entries of the state


def checkpoint_path(out: Path) -> Path:
    """Where the checkpoint of a calibration into ``out`` lives: a hidden sibling file."""
    return out.parent / f".{out.name}.checkpoint.safetensors"


def _legacy_path(out_checkpoint: Path) -> Path:
    """Where rstr before this format kept the (pickled) checkpoint for the same ``out``."""
    return out_checkpoint.with_name(out_checkpoint.name.removesuffix(".safetensors") + ".pt")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a training state of :func:`rstr.calibrate.calibrate` (with ``lora``, ``optimizer``,
    ``lr_scheduler`` and ``generator``) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for part in _PARTS:
        data: CalibrationData = state[part]
        tensors[f"{part}.noise"], tensors[f"{part}.target"] = data.noise, data.target
        tensors.update({f"{part}.cond.{k}": v for k, v in data.cond.items()})
    tensors.update({f"lora.{k}": v for k, v in state["lora"].items()})
    optimizer = state["optimizer"]
    for index, moments in optimizer["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in moments.items()})
    document = {
        "format": CHECKPOINT_FORMAT,
        **{k: state[k] for k in ("settings", "iteration", "losses", "spectra", "ranks", "validation_before", "lr_scheduler")},
        "param_groups": optimizer["param_groups"],
        "generator": state["generator"].tolist(),
    }
    # clone: the pool and validation data are views of one tensor, which safetensors refuses to store twice
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(document)})


def load_checkpoint(path: Path, settings: dict, modules: Sequence[str]) -> dict | None:
    """The checkpoint's state if it exists and was written with the same ``settings`` for these ``modules``
    (ranks and sensitivity for each); None if there is none.

    A file that is not such a checkpoint, or a pickled checkpoint of an older rstr, is refused in one line.
    """
    if not path.is_file():
        legacy = _legacy_path(path)
        if legacy.is_file():
            raise RstrError(
                f"checkpoint {legacy} is in the pickle format of an older rstr, which is no longer loaded "
                "(unpickling can run code); delete it and run without --resume"
            )
        return None
    try:
        with safe_open(str(path), "pt") as f:
            document = json.loads((f.metadata() or {}).get(_HEADER_KEY, "null"))
            _check_document(document, path, settings, modules)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, ValueError, RecursionError) as err:
        raise RstrError(
            f"checkpoint {path} is not a readable rstr calibration checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); delete it or run without --resume"
        ) from None
    return _state(document, tensors, path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(map(_is_number, v))


# every field of the JSON document: what its value must be, checked before any value is used
_SHAPE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "settings": (lambda v: isinstance(v, dict), "an object"),
    "iteration": (_is_int, "an integer"),
    "losses": (_numbers, "a list of numbers"),
    "spectra": (lambda v: isinstance(v, dict) and all(map(_numbers, v.values())), "an object of number lists"),
    "ranks": (
        lambda v: isinstance(v, dict) and all(_is_int(r) and r in (0, *RANKS) for r in v.values()),
        f"an object of ranks in {(0, *RANKS)}",
    ),
    "validation_before": (_is_number, "a number"),
    "lr_scheduler": (lambda v: isinstance(v, dict), "an object"),
    "param_groups": (
        lambda v: (
            isinstance(v, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) and all(map(_is_int, g["params"])) for g in v)
        ),
        "a list of parameter groups",
    ),
    "generator": (lambda v: isinstance(v, list) and all(_is_int(b) and 0 <= b < 256 for b in v), "a list of bytes"),
}


def _check_document(document: Any, path: Path, settings: dict, modules: Sequence[str]) -> None:
    """Refuse a header document of the wrong shape, or one written with other settings, naming the field."""
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise RstrError(
            f"checkpoint {path} is not an rstr calibration checkpoint (format {CHECKPOINT_FORMAT!r} expected); "
            "delete it or run without --resume"
        )
    for key, (valid, what) in _SHAPE.items():
        if not valid(document.get(key)):
            raise RstrError(f"checkpoint {path}: {key!r} must be {what}; delete it or run without --resume")
    saved, wanted = document["settings"], json.loads(json.dumps(settings))
    if saved != wanted:
        differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise RstrError(
            f"checkpoint {path} was written with different settings ({', '.join(differ)}); drop --resume or delete it"
        )
    if not 0 < document["iteration"] < settings["iterations"] or len(document["losses"]) != document["iteration"]:
        raise RstrError(
            f"checkpoint {path}: iteration {document['iteration']} with {len(document['losses'])} losses does not "
            f"fit a run of {settings['iterations']} iterations; delete it or run without --resume"
        )
    if sorted(document["ranks"]) != sorted(modules) or sorted(document["spectra"]) != sorted(modules):
        raise RstrError(
            f"checkpoint {path}: its ranks and sensitivity are not for this model's {len(modules)} layers; "
            "delete it or run without --resume"
        )


def _state(document: dict, tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """The training state of a checked document and its tensors, as :func:`save_checkpoint` was given it."""

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    missing = [f"{p}.{k}" for p in _PARTS for k in ("noise", "target") if f"{p}.{k}" not in tensors]
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in under("optimizer.").items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name:
            raise RstrError(f"checkpoint {path}: unexpected tensor optimizer.{key}; delete it or run without --resume")
        moments.setdefault(int(index), {})[name] = value
    if missing or not under("lora."):
        raise RstrError(
            f"checkpoint {path} lacks tensor {missing[0] if missing else 'lora.*'}; delete it or run without --resume"
        )
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g for g in document["param_groups"]]
    state = {k: document[k] for k in ("settings", "iteration", "losses", "spectra", "ranks", "validation_before", "lr_scheduler")}
    for part in _PARTS:
        state[part] = CalibrationData(tensors[f"{part}.noise"], under(f"{part}.cond."), tensors[f"{part}.target"])
    return {
        **state,
        "lora": under("lora."),
        "optimizer": {"state": moments, "param_groups": groups},
        "generator": torch.tensor(document["generator"], dtype=torch.uint8),
    }
