// A JSON Schema (draft 2020-12) validator for the keywords rstr's schemas use, and the bundle
// schema embedded at build time from engines/schemas/bundle.schema.json.
//
// Debian has no C++ JSON-Schema library, so this implements only what the schemas need: type,
// properties, required, additionalProperties, items, enum, const, minimum, maximum,
// exclusiveMinimum, minItems, maxItems, pattern and $ref to "#/$defs/...".  A schema with any
// other validation keyword is refused (std::logic_error) rather than half-enforced; the Python
// tests keep the schemas inside this subset.  Violations are worded as the Python reader words
// them (engines/schema.py): "<path> <problem>", paths like plan.steps[3].coef_eps.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace rstr::schema {

/// The first place where `instance` breaks `schema`, as one line, or nothing when it is valid.
std::optional<std::string> first_violation(const nlohmann::json& instance, const nlohmann::json& schema);

/// "null", "boolean", "integer", "number", "string", "array" or "object" (integer and number apart).
std::string json_type(const nlohmann::json& v);

/// A value in a message: scalars as compact JSON (long strings cut), containers by their type only.
std::string dump(const nlohmann::json& v);

/// The manifest.json schema (engines/schemas/bundle.schema.json, embedded by CMake).
const nlohmann::json& bundle_schema();

}  // namespace rstr::schema
