// A validator for the JSON Schema keywords rstr's schemas use (see schema.hpp).
#include "schema.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <regex>
#include <set>
#include <stdexcept>
#include <vector>

#include "rstr/bundle_schema.hpp"

namespace rstr::schema {
namespace {

constexpr size_t kMaxQuoted = 60;  // characters of a string value quoted in a message (MAX_QUOTED in schema.py)

using json = nlohmann::json;

const std::set<std::string> kAnnotations = {"$schema", "$id", "$defs", "title", "description"};
const std::set<std::string> kKeywords = {"type",     "properties", "required", "additionalProperties",
                                         "items",    "enum",       "const",    "minimum",
                                         "maximum",  "exclusiveMinimum", "minItems", "maxItems",
                                         "pattern",  "$ref"};

/// "plan" + "steps" -> "plan.steps"; keys that are not identifiers are quoted: files["a.onnx"].
std::string child(const std::string& path, const std::string& key) {
  const bool identifier = !key.empty() && (std::isalpha(static_cast<unsigned char>(key[0])) || key[0] == '_') &&
                          std::all_of(key.begin(), key.end(), [](char c) {
                            return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
                          });
  if (!identifier) return path + "[" + json(key).dump() + "]";
  return path.empty() ? key : path + "." + key;
}

}  // namespace

std::string json_type(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "integer";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "array";
  return "object";
}

namespace {

bool has_type(const json& v, const std::string& type) {
  if (type == "integer") return v.is_number_integer() || v.is_number_unsigned();  // strict: 1.0 is a number
  if (type == "number") return v.is_number();
  return json_type(v) == type;
}

std::string type_phrase(const json& types) {
  auto one = [](const std::string& t) {
    if (t == "object" || t == "array" || t == "integer") return "an " + t;
    if (t == "null") return t;
    return "a " + t;
  };
  if (types.is_string()) return one(types.get<std::string>());
  std::string out;
  for (const auto& t : types) out += (out.empty() ? "" : " or ") + one(t.get<std::string>());
  return out;
}

}  // namespace

std::string dump(const json& v) {
  if (v.is_array() || v.is_object()) return type_phrase(json_type(v));
  if (v.is_string()) {  // cut after kMaxQuoted characters (UTF-8 code points), as schema.py does
    const std::string& text = v.get_ref<const std::string&>();
    size_t chars = 0;
    for (size_t i = 0; i < text.size(); ++i)
      if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80 && ++chars > kMaxQuoted)
        return json(text.substr(0, i)).dump(-1, ' ', false, json::error_handler_t::replace) + "...";
  }
  return v.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

class Validator {
 public:
  explicit Validator(const json& root) : root_(root) {}

  std::optional<std::string> check(const json& v, const json& s, const std::string& path) const {
    if (!s.is_object()) throw std::logic_error("rstr schema has a subschema that is not an object at " + path);
    for (auto it = s.begin(); it != s.end(); ++it)
      if (!kKeywords.count(it.key()) && !kAnnotations.count(it.key()))
        throw std::logic_error("rstr schema uses the keyword '" + it.key() + "', which this validator does not implement");
    if (s.contains("$ref"))
      if (auto problem = check(v, resolve(s.at("$ref").get<std::string>()), path)) return problem;
    if (s.contains("type") && !type_ok(v, s.at("type")))
      return with_description(path + " must be " + type_phrase(s.at("type")) + " (got " + json_type(v) + ")", s);
    if (s.contains("enum")) {
      const json& options = s.at("enum");
      if (std::find(options.begin(), options.end(), v) == options.end()) {
        std::vector<std::string> names;
        for (const auto& o : options) names.push_back(dump(o));
        return path + " is " + dump(v) + "; expected one of " + join(names);
      }
    }
    if (s.contains("const") && v != s.at("const")) return path + " is " + dump(v) + ", not " + dump(s.at("const"));
    if (v.is_number()) {
      const double x = v.get<double>();
      if (s.contains("minimum") && x < s.at("minimum").get<double>())
        return path + " is " + dump(v) + "; it must be at least " + dump(s.at("minimum"));
      if (s.contains("maximum") && x > s.at("maximum").get<double>())
        return path + " is " + dump(v) + "; it must be at most " + dump(s.at("maximum"));
      if (s.contains("exclusiveMinimum") && x <= s.at("exclusiveMinimum").get<double>())
        return path + " is " + dump(v) + "; it must be greater than " + dump(s.at("exclusiveMinimum"));
    }
    if (v.is_string() && s.contains("pattern")) {
      const std::string pattern = s.at("pattern").get<std::string>();
      if (!std::regex_search(v.get<std::string>(), std::regex(pattern, std::regex::ECMAScript)))
        return with_description(path + " is " + dump(v) + "; it must match " + pattern, s);
    }
    if (v.is_array()) return check_array(v, s, path);
    if (v.is_object()) return check_object(v, s, path);
    return std::nullopt;
  }

 private:
  const json& resolve(const std::string& ref) const {
    const std::string prefix = "#/$defs/";
    if (ref.compare(0, prefix.size(), prefix) != 0)
      throw std::logic_error("rstr schema has $ref '" + ref + "'; this validator resolves #/$defs/<name> only");
    return root_.at("$defs").at(ref.substr(prefix.size()));
  }

  static bool type_ok(const json& v, const json& type) {
    if (type.is_string()) return has_type(v, type.get<std::string>());
    return std::any_of(type.begin(), type.end(), [&](const json& t) { return has_type(v, t.get<std::string>()); });
  }

  static std::string with_description(std::string text, const json& s) {
    if (s.contains("description")) text += " (" + s.at("description").get<std::string>() + ")";
    return text;
  }

  std::optional<std::string> check_array(const json& v, const json& s, const std::string& path) const {
    const auto n = v.size();
    if (s.contains("minItems") && n < s.at("minItems").get<size_t>())
      return path + " has " + std::to_string(n) + " item(s); it must have at least " + dump(s.at("minItems"));
    if (s.contains("maxItems") && n > s.at("maxItems").get<size_t>())
      return path + " has " + std::to_string(n) + " item(s); it must have at most " + dump(s.at("maxItems"));
    if (s.contains("items"))
      for (size_t i = 0; i < n; ++i)
        if (auto problem = check(v[i], s.at("items"), path + "[" + std::to_string(i) + "]")) return problem;
    return std::nullopt;
  }

  std::optional<std::string> check_object(const json& v, const json& s, const std::string& path) const {
    const std::string lead = path.empty() ? "" : path + ": ";
    if (s.contains("required")) {
      std::vector<std::string> missing;
      for (const auto& key : s.at("required"))
        if (!v.contains(key.get<std::string>())) missing.push_back(key.get<std::string>());
      if (!missing.empty()) return lead + "missing field(s) " + join(missing);
    }
    static const json kNoProperties = json::object();
    const json& properties = s.contains("properties") ? s.at("properties") : kNoProperties;
    if (s.contains("additionalProperties") && s.at("additionalProperties").is_boolean() &&
        !s.at("additionalProperties").get<bool>()) {
      std::vector<std::string> unknown, allowed;
      for (auto it = v.begin(); it != v.end(); ++it)
        if (!properties.contains(it.key())) unknown.push_back(it.key());
      for (auto it = properties.begin(); it != properties.end(); ++it) allowed.push_back(it.key());
      if (!unknown.empty()) return lead + "unknown field(s) " + join(unknown) + "; allowed: " + join(allowed);
    }
    for (auto it = v.begin(); it != v.end(); ++it) {  // keys in sorted order (nlohmann objects are maps)
      const std::string where = child(path, it.key());
      if (properties.contains(it.key())) {
        if (auto problem = check(it.value(), properties.at(it.key()), where)) return problem;
      } else if (s.contains("additionalProperties") && s.at("additionalProperties").is_object()) {
        if (auto problem = check(it.value(), s.at("additionalProperties"), where)) return problem;
      }
    }
    return std::nullopt;
  }

  const json& root_;
};

}  // namespace

std::optional<std::string> first_violation(const json& instance, const json& schema) {
  return Validator(schema).check(instance, schema, "");
}

const json& bundle_schema() {
  static const json schema = json::parse(kBundleSchemaText);
  return schema;
}

}  // namespace rstr::schema
