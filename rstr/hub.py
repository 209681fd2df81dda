"""Models by Hugging Face Hub id, resolved from the local Hugging Face cache only.

``resolve_model("org/name")`` returns the cached snapshot directory of that repository (the
revision ``main`` unless ``revision`` names a branch, tag or commit), found the way
``huggingface_hub`` finds it offline: the cache is ``HF_HUB_CACHE`` (or ``HF_HOME/hub``),
and nothing is ever downloaded -- with or without ``HF_HUB_OFFLINE=1`` rstr makes no network
call.  Fill the cache first (``hf download org/name``).  A local path is returned unchanged,
so every command takes either.  A missing model is the same one-line :class:`ModelError` for
both: what was looked for, where, and how to get it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rstr.errors import ModelError

# owner/name as the Hub spells repository ids (letters, digits, '-', '_', '.'); anything else is a path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str | os.PathLike[str]) -> bool:
    """True when ``name`` has the shape of a Hub repository id (``owner/name``)."""
    return _HUB_ID.fullmatch(os.fspath(name)) is not None


def resolve_model(name_or_path: str | os.PathLike[str], revision: str | None = None, variant: str | None = None) -> Path:
    """The local directory of a model given as a path or as a Hub id in the local cache.

    ``revision`` (a branch, tag or commit of a Hub id) picks the cached snapshot; ``variant``
    (e.g. ``fp16``) must have weight files in the directory (``*.fp16.safetensors``), which
    diffusers' ``from_pretrained(..., variant=)`` then loads.
    """
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise ModelError(f"--revision {revision} applies to Hub ids, but {path} is a local directory; drop --revision")
        directory = path
    elif is_hub_id(name_or_path):
        directory = _cached_snapshot(os.fspath(name_or_path), revision)
    else:
        raise ModelError(
            f"model path {path} does not exist; give a local diffusers directory or a Hub id (owner/name) in the local Hugging Face cache"
        )
    if variant is not None and not _has_variant(directory, variant):
        raise ModelError(
            f"{name_or_path} has no {variant!r} weights (files named *.{variant}.safetensors) in {directory}; "
            f"drop --variant or fetch them with `hf download {name_or_path} --include '*{variant}*'`"
        )
    return directory


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        at = f" at revision {revision}" if revision is not None else ""
        raise ModelError(
            f"model {repo_id}{at} is neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"rstr does not download: fetch it with `hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "` or give a local diffusers directory"
        ) from None


def _has_variant(directory: Path, variant: str) -> bool:
    """True when some weight file under ``directory`` carries ``variant`` (``name.<variant>.ext``, as diffusers names them)."""
    return any(variant in f.name.split(".")[1:-1] for f in directory.rglob("*") if f.suffix in (".safetensors", ".bin", ".json"))
