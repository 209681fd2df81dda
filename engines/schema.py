"""The JSON Schemas of rstr's file formats, and their violations as one line.

``schemas/bundle.schema.json`` describes a bundle's ``manifest.json`` and
``schemas/schedule.schema.json`` a ``rstr.schedule/1`` file (draft 2020-12, package data of
``rstr.engines``).  Readers validate a document before reading any value from it: here with
``jsonschema``, in the C++ runtime with a small validator of the keywords in :data:`KEYWORDS`
(engines/cpp/src/schema.cpp; Debian has no C++ JSON-Schema library).  Both readers word a
violation the same way, ``<path> <problem>`` with paths like ``plan.steps[3].coef_eps``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

# The validation keywords the schemas may use: the subset the C++ validator implements.
KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "minItems",
        "maxItems",
        "pattern",
        "$ref",
    }
)
ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description"})
MAX_QUOTED = 60  # characters (code points) of a string value quoted in a message
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@cache
def load(name: str) -> dict[str, Any]:
    """The schema ``name`` (``"bundle"`` or ``"schedule"``) as a dict."""
    return json.loads((resources.files("rstr.engines") / "schemas" / f"{name}.schema.json").read_text())


@cache
def _validator(name: str):
    """A draft 2020-12 validator whose ``integer`` is strict: ``1.0`` is a number, not an integer (as in C++)."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return validators.extend(Draft202012Validator, type_checker=checker)(load(name))


@dataclass(frozen=True)
class Violation:
    """Where a document breaks its schema (keys and indices from the root) and what is wrong, in words."""

    path: tuple[str | int, ...]
    problem: str

    def __str__(self) -> str:
        return self.problem


# The order in which the C++ validator tries the keywords at one place in a document.
_KEYWORD_ORDER = (
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "pattern",
    "minItems",
    "maxItems",
    "required",
    "additionalProperties",
)


def _reading_order(error) -> tuple:
    """Where the C++ validator (depth first, object keys in sorted order, a node before its children) meets ``error``."""
    return tuple(error.absolute_path), _KEYWORD_ORDER.index(error.validator)


def check(document: Any, name: str) -> Violation | None:
    """The first violation of schema ``name`` in ``document`` in the order the C++ validator reads it, or None.

    Both readers thus name the same problem when a document has several.
    """
    errors = list(_validator(name).iter_errors(document))
    if not errors:
        return None
    error = min(errors, key=_reading_order)
    path = tuple(error.absolute_path)
    return Violation(path, describe(error.validator, error.validator_value, error.instance, error.schema, path))


def where(path: Sequence[str | int]) -> str:
    """``("plan", "steps", 3, "coef_eps")`` -> ``plan.steps[3].coef_eps``; odd keys as ``files["a.onnx"]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def json_type(value: Any) -> str:
    """The JSON type name of a parsed value (``integer`` and ``number`` apart, as JSON Schema names them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _types(types: str | list[str]) -> str:
    article = {
        "object": "an object",
        "array": "an array",
        "integer": "an integer",
        "string": "a string",
        "number": "a number",
        "boolean": "a boolean",
        "null": "null",
    }
    return " or ".join(article[t] for t in ([types] if isinstance(types, str) else types))


def dump(value: Any) -> str:
    """A value in a message: scalars as compact JSON (long strings cut), containers by their type only."""
    if isinstance(value, (list, dict)):
        return _types(json_type(value))
    if isinstance(value, str) and len(value) > MAX_QUOTED:
        return json.dumps(value[:MAX_QUOTED], ensure_ascii=False) + "..."
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def describe(keyword: str, expected: Any, value: Any, schema: dict, path: Sequence[str | int]) -> str:
    """One line for a failed ``keyword``: the same words as the C++ validator (engines/cpp/src/schema.cpp)."""
    at = where(path)
    lead = f"{at}: " if at else ""
    if keyword == "type":
        text = f"{at} must be {_types(expected)} (got {json_type(value)})"
    elif keyword == "required":
        text = f"{lead}missing field(s) {', '.join(k for k in expected if k not in value)}"
    elif keyword == "additionalProperties":
        allowed = schema.get("properties", {})
        text = f"{lead}unknown field(s) {', '.join(sorted(k for k in value if k not in allowed))}; allowed: {', '.join(sorted(allowed))}"
    elif keyword == "enum":
        text = f"{at} is {dump(value)}; expected one of {', '.join(dump(v) for v in expected)}"
    elif keyword == "const":
        text = f"{at} is {dump(value)}, not {dump(expected)}"
    elif keyword in ("minimum", "maximum", "exclusiveMinimum"):
        bound = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "greater than"}[keyword]
        text = f"{at} is {dump(value)}; it must be {bound} {dump(expected)}"
    elif keyword in ("minItems", "maxItems"):
        bound = "at least" if keyword == "minItems" else "at most"
        text = f"{at} has {len(value)} item(s); it must have {bound} {expected}"
    elif keyword == "pattern":
        text = f"{at} is {dump(value)}; it must match {expected}"
    else:
        raise ValueError(f"schema keyword {keyword!r} is outside the subset rstr's schemas use ({', '.join(sorted(KEYWORDS))})")
    return f"{text} ({schema['description']})" if keyword in ("type", "pattern") and "description" in schema else text
