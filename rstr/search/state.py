"""Stage-1 checkpoints: the state a resumed search continues from, and the checks before resuming it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rstr.errors import RstrError
from rstr.families.base import Family
from rstr.search.config import SearchConfig
from rstr.search.genome import Genome
from rstr.search.objectives import Metrics, Objective

CHECKPOINT_FORMAT = "rstr.search-checkpoint/1"


@dataclass
class SearchState:
    """Everything a resumed search needs: it continues from here exactly as if never stopped."""

    generation: int  # -1 until the initial population has been scored
    population: list[Genome]
    rng: np.random.Generator
    search: dict[str, Metrics]  # fitness cache on search seeds, by schedule key
    validation: dict[str, Metrics]  # finalists on the second group of search-pool seeds
    held_out: dict[str, Metrics]  # scores on held-out seeds, by schedule key
    ga_keys: list[str]  # schedules the evolution itself scored, in order
    history: list[dict[str, Any]]

    @classmethod
    def fresh(cls, seed: int) -> SearchState:
        return cls(-1, [], np.random.default_rng(seed), {}, {}, {}, [], [])

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "population": [g.to_json() for g in self.population],
            "rng": self.rng.bit_generator.state,
            "search": self.search,
            "validation": self.validation,
            "held_out": self.held_out,
            "ga_keys": self.ga_keys,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        rng = np.random.default_rng()
        rng.bit_generator.state = data["rng"]
        return cls(
            data["generation"],
            [Genome.from_json(g) for g in data["population"]],
            rng,
            data["search"],
            data["validation"],
            data["held_out"],
            data["ga_keys"],
            data["history"],
        )


def model_identity(family: Family) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's path, family, size and sampler."""
    return {
        "path": str(family.path) if family.path is not None else None,
        "family": family.name,
        "parameters": sum(p.numel() for p in family.transformer.parameters()),
        "sampler": family.sampler,
    }


CHECKPOINT_FILE = "checkpoint.json"


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``directory/checkpoint.json``; a missing or foreign file is one :class:`RstrError` line."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise RstrError(
            f"--resume {directory}: no {CHECKPOINT_FILE} there; give the checkpoint directory of an earlier `rstr search`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RstrError(f"--resume {directory}: {CHECKPOINT_FILE} is not readable JSON ({err}); start a new search") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise RstrError(f"--resume {directory}: not an rstr search checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return data


def check_resumable(
    data: dict[str, Any], directory: Path, model: dict[str, Any], config: SearchConfig, objective: Objective
) -> None:
    """Refuse to resume a checkpoint made for another model, configuration or objective, naming the difference."""
    if data["model"] != model:
        raise RstrError(
            f"--resume {directory} was made for model {data['model'].get('path')} ({data['model'].get('family')}); "
            f"this run uses {model.get('path')}: pass the same --model or start a new search"
        )
    saved = data["config"]
    for k, v in config.to_json().items():
        if saved.get(k) != v:
            raise RstrError(
                f"--resume {directory} was made with {k}={saved.get(k)!r}, this run has {k}={v!r}: drop the option or start a new search"
            )
    if data["objective"] != objective.describe():
        raise RstrError(
            f"--resume {directory} was scored with objective {data['objective']}, this run with {objective.describe()}; start a new search"
        )
