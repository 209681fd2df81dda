"""Write a bundle directory: graphs, manifest with sha256 of every file, provenance.

Everything is written into a temporary sibling directory and renamed onto the target only
when complete, so an interrupted build never leaves a bundle that looks finished.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import replace
from pathlib import Path

from rstr.engines.bundle import sha256_file
from rstr.engines.manifest import FileEntry, Manifest


def versions() -> dict[str, str]:
    import diffusers
    import onnx
    import torch

    import rstr

    return {"rstr": rstr.__version__, "torch": torch.__version__, "onnx": onnx.__version__, "diffusers": diffusers.__version__}


def file_table(root: Path, names: list[str]) -> dict[str, FileEntry]:
    """sha256 and size of each listed file (relative POSIX paths)."""
    return {n: FileEntry(sha256_file(root / n), (root / n).stat().st_size) for n in sorted(names)}


def bundle_files(root: Path) -> list[str]:
    """Every file of the bundle but the manifest itself."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"]


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Fill ``files`` and the creation time; write ``manifest.json``; return what was written."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    provenance = replace(manifest.provenance, created=created)
    manifest = replace(manifest, files=file_table(root, bundle_files(root)), provenance=provenance)
    (root / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
