"""Open and check a bundle: manifest format and version, safe file paths, sha256 of every file.

This is the only reader of ``manifest.json`` on the Python side; the C++ runtime applies the
same checks (docs/bundle.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rstr.errors import BundleError

FORMAT = "rstr.bundle"
VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_member(root: Path, name: str) -> Path:
    """Resolve a manifest file entry inside ``root``; refuse absolute paths and ``..``."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in name:
        raise BundleError(f"manifest file entry {name!r} points outside the bundle; entries must be relative paths inside it")
    return root / Path(*p.parts)


@dataclass(frozen=True)
class TensorDesc:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in self.shape)

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    @classmethod
    def from_json(cls, d: dict) -> "TensorDesc":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Bundle:
    """A checked bundle directory and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify_checksums: bool = True) -> "Bundle":
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle {root} does not exist or is not a directory; build one with `rstr-export build --out {root}`")
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise BundleError(f"{root} has no manifest.json; it is not a complete bundle (rebuild it)")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{mpath} is not valid JSON ({err})") from None
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise BundleError(f"{mpath}: bundle version {manifest.get('version')!r} is not supported (this rstr reads version {VERSION}); rebuild the bundle")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{mpath}: 'files' must list every file with its sha256")
        for name, entry in files.items():
            member = safe_member(root, name)
            if not member.is_file():
                raise BundleError(f"bundle file {name} is missing from {root}; rebuild the bundle")
            if verify_checksums and sha256_file(member) != entry.get("sha256"):
                raise BundleError(f"bundle file {name} fails its sha256 check (corrupt or modified); rebuild the bundle")
        for graph in manifest["graphs"].values():
            if graph["file"] not in files:
                raise BundleError(f"{mpath}: graph file {graph['file']} is not listed in 'files'")
        return cls(root, manifest)

    # ---------------------------------------------------------------- accessors
    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def batch(self) -> int:
        return int(self.manifest["batch"])

    @property
    def plan(self) -> dict[str, Any]:
        return self.manifest["plan"]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.manifest["plan"]["steps"]

    def graph_path(self, name: str) -> Path:
        return safe_member(self.root, self.manifest["graphs"][name]["file"])

    def graph_inputs(self, name: str) -> list[TensorDesc]:
        return [TensorDesc.from_json(d) for d in self.manifest["graphs"][name]["inputs"]]

    def graph_outputs(self, name: str) -> list[TensorDesc]:
        """The graph's outputs; a manifest that omits them gets them from the contract (``[batch, ...]`` like the sample)."""
        descs = self.manifest["graphs"][name].get("outputs")
        if descs:
            return [TensorDesc.from_json(d) for d in descs]
        sample = self.batched_sample
        if name == "denoiser":
            return [TensorDesc("model_output", sample.dtype, sample.shape)]
        return [TensorDesc("next_sample", sample.dtype, sample.shape), TensorDesc("next_sample_pair", sample.dtype, sample.shape)]

    @property
    def sample(self) -> TensorDesc:
        return TensorDesc.from_json(self.manifest["sample"])

    @property
    def batched_sample(self) -> TensorDesc:
        """The manifest's ``sample`` (concrete, ``[B, ...]``) with its batch axis named, to rebatch it."""
        sample = self.sample
        return TensorDesc(sample.name, sample.dtype, ("batch",) + tuple(sample.shape[1:]))

    @property
    def cond_inputs(self) -> list[TensorDesc]:
        return [TensorDesc.from_json(d) for d in self.manifest["conditioning"]["inputs"]]

    def engines_for(self, backend: str) -> list[dict[str, Any]]:
        return [e for e in self.manifest.get("engines", []) if e.get("backend", "tensorrt") == backend]
