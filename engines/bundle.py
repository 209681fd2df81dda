"""Open and check a bundle: its manifest (typed, schema-validated), its files and its graphs.

This is the only reader of ``manifest.json`` on the Python side: :meth:`Bundle.open` reads it
strictly (:func:`rstr._io.read_json`), :class:`rstr.engines.manifest.Manifest` validates it, and
:mod:`rstr.engines.validate` checks every listed file (plain files inside the bundle, sizes,
sha256) and every graph file against the manifest.  The C++ runtime applies the same checks
in the same order (docs/bundle.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rstr.engines.endpoints import Decoder
from rstr.engines.manifest import Engine, Manifest, Plan, Step, TensorDesc
from rstr.engines.validate import GRAPHS, entry_problem, file_problems, graph_file_problem, sha256_file

from rstr._io import read_json
from rstr.errors import BundleError

__all__ = ["Bundle", "safe_member", "sha256_file"]


def safe_member(root: Path, name: str) -> Path:
    """``root / name`` for a plain relative path ``name``; refuse absolute paths, ``..`` and odd components."""
    problem = entry_problem(name)
    if problem is not None:
        raise BundleError(problem)
    return root.joinpath(*name.split("/"))


@dataclass(frozen=True)
class Bundle:
    """A checked bundle directory and its manifest."""

    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify_checksums: bool = True) -> Bundle:
        """Read and check the bundle at ``path``: one :class:`BundleError` line on the first problem found
        (every file problem at once); ``verify_checksums=False`` skips sizes and sha256 (for the builder)."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(
                f"bundle {root} does not exist or is not a directory; build one with `rstr-export build --out {root}`"
            )
        mpath = root / "manifest.json"
        if mpath.is_symlink():
            raise BundleError(f"bundle {root}: manifest.json is a symbolic link; bundles hold plain files")
        if not mpath.is_file():
            raise BundleError(f"{root} has no manifest.json; it is not a complete bundle (rebuild it)")
        manifest = Manifest.from_json(read_json(mpath, BundleError), source=str(mpath))
        problems = file_problems(root, manifest.files, verify_checksums)
        if problems:
            raise BundleError(f"bundle {root}: {'; '.join(problems)}")
        for name in [*GRAPHS, *sorted(set(manifest.graphs) - set(GRAPHS))]:  # the plan's, then the decoder's and encoders'
            problem = graph_file_problem(root, name, manifest.graphs[name], manifest.files, manifest.batch)
            if problem is not None:
                raise BundleError(f"bundle {root}: {problem}")
        return cls(root, manifest)

    def member(self, name: str) -> Path:
        """The path of ``name`` if the manifest lists it (checked, hashed and free of links at open)."""
        if name not in self.manifest.files:
            raise BundleError(f"bundle {self.root}: '{name}' is not listed in its manifest's files; rebuild the bundle")
        return safe_member(self.root, name)

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
        return self.member(self.manifest.graphs[name].file)

    def graph_inputs(self, name: str) -> list[TensorDesc]:
        return list(self.manifest.graphs[name].inputs)

    def graph_outputs(self, name: str) -> list[TensorDesc]:
        return list(self.manifest.graphs[name].outputs)

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
