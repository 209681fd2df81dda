"""Open and check a bundle: its manifest (typed, schema-validated), safe file paths, sha256 of every file.

This is the only reader of ``manifest.json`` on the Python side (:class:`rstr.engines.manifest.Manifest`
parses it); the C++ runtime validates against the same schema and applies the same checks
(docs/bundle.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rstr.engines.manifest import Decoder, Engine, Manifest, Plan, Step, TensorDesc

from rstr.errors import BundleError


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


def _check_history(manifest: Manifest, mpath: Path) -> None:
    """The step graphs carry the history the plan's updates read: ``history [batch, k, 2, ...]`` for k past steps."""
    k = manifest.plan.history
    for name in ("step_guided", "step_single"):
        desc = {d.name: d for d in manifest.graphs[name].inputs}.get("history")
        depth = 0 if desc is None or len(desc.shape) < 2 else desc.shape[1]
        if depth != k:
            raise BundleError(
                f"{mpath}: the plan's updates use {k} past step(s) but graph {name} carries a history of {depth}; "
                "rebuild the bundle"
            )


@dataclass(frozen=True)
class Bundle:
    """A checked bundle directory and its manifest."""

    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify_checksums: bool = True) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise BundleError(
                f"bundle {root} does not exist or is not a directory; build one with `rstr-export build --out {root}`"
            )
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise BundleError(f"{root} has no manifest.json; it is not a complete bundle (rebuild it)")
        try:
            data = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{mpath} is not valid JSON ({err})") from None
        manifest = Manifest.from_json(data, source=str(mpath))
        if not manifest.files:
            raise BundleError(f"{mpath}: 'files' must list every file with its sha256")
        for name, entry in manifest.files.items():
            member = safe_member(root, name)
            if not member.is_file():
                raise BundleError(f"bundle file {name} is missing from {root}; rebuild the bundle")
            if verify_checksums and sha256_file(member) != entry.sha256.lower():
                raise BundleError(f"bundle file {name} fails its sha256 check (corrupt or modified); rebuild the bundle")
        for graph in manifest.graphs.values():
            if graph.file not in manifest.files:
                raise BundleError(f"{mpath}: graph file {graph.file} is not listed in 'files'")
        _check_history(manifest, mpath)
        return cls(root, manifest)

    def with_batch(self, batch: int) -> Bundle:
        """The same bundle walked at another batch: the same graph files (their batch axis is dynamic), the plan
        and declared shapes for ``batch``.  TensorRT engines keep the profiles they were built with."""
        return Bundle(self.root, self.manifest.with_batch(batch))

    # ---------------------------------------------------------------- accessors
    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def batch(self) -> int:
        return self.manifest.batch

    @property
    def plan(self) -> Plan:
        return self.manifest.plan

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.manifest.plan.steps

    @property
    def decoder(self) -> Decoder | None:
        return self.manifest.decoder

    def graph_path(self, name: str) -> Path:
        return safe_member(self.root, self.manifest.graphs[name].file)

    def graph_inputs(self, name: str) -> list[TensorDesc]:
        return list(self.manifest.graphs[name].inputs)

    def graph_outputs(self, name: str) -> list[TensorDesc]:
        """The graph's outputs; a manifest that omits them gets them from the contract (``[batch, ...]`` like the sample)."""
        descs = self.manifest.graphs[name].outputs
        if descs:
            return list(descs)
        sample = self.batched_sample
        if name == "denoiser":
            return [TensorDesc("model_output", sample.dtype, sample.shape)]
        return [TensorDesc("next_sample", sample.dtype, sample.shape), TensorDesc("next_sample_pair", sample.dtype, sample.shape)]

    @property
    def sample(self) -> TensorDesc:
        return self.manifest.sample

    @property
    def batched_sample(self) -> TensorDesc:
        """The manifest's ``sample`` (concrete, ``[B, ...]``) with its batch axis named, to rebatch it."""
        sample = self.sample
        return TensorDesc(sample.name, sample.dtype, ("batch",) + tuple(sample.shape[1:]))

    @property
    def cond_inputs(self) -> list[TensorDesc]:
        return list(self.manifest.conditioning.inputs)

    def engines_for(self, backend: str) -> list[Engine]:
        return self.manifest.engines_for(backend)
