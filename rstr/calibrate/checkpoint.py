"""Stage-2 checkpoints: the training state a resumed calibration continues from."""

from __future__ import annotations

from pathlib import Path

import torch

from rstr._io import atomic_path
from rstr.errors import RstrError


def checkpoint_path(out: Path) -> Path:
    """Where the checkpoint of a calibration into ``out`` lives: a hidden sibling file."""
    return out.parent / f".{out.name}.checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, settings: dict) -> dict | None:
    """The checkpoint's state if it exists and was written with the same settings."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("settings") != settings:
        differ = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise RstrError(f"checkpoint {path} was written with different settings ({', '.join(differ)}); drop --resume or delete it")
    return state
