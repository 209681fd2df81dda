// Internal: the rules of a bundle that its JSON Schema cannot state (engines/validate.py has the
// same rules, in the same order, in the same words).
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "rstr/runtime.hpp"

namespace rstr::validate {

/// Values in one tensor at 2B rows (int32 indexing in ONNX Runtime and TensorRT kernels).
constexpr uint64_t kMaxElements = 2147483647ULL;

/// The first rule a schema-valid manifest breaks, in words, or nothing.
std::optional<std::string> document_problem(const nlohmann::json& manifest);

/// Every problem of the listed files (plain relative paths, no symbolic links, sizes, sha256), in name order.
std::vector<std::string> file_problems(const std::filesystem::path& dir, const std::map<std::string, FileEntry>& files,
                                       Verify verify);

/// Whether the ONNX file of graph `name` has the inputs and outputs the manifest describes and keeps
/// external weights only in listed files.
std::optional<std::string> graph_file_problem(const std::filesystem::path& dir, const std::string& name,
                                              const nlohmann::json& graph, const std::map<std::string, FileEntry>& files,
                                              int64_t batch);

/// "[batch, 1, 8, 8]".
std::string shape_text(const nlohmann::json& shape);

// Helpers shared by validate.cpp (the document) and validate_files.cpp (the files and graphs).

inline bool is_int(const nlohmann::json& v) { return v.is_number_integer() || v.is_number_unsigned(); }

/// A schema-checked non-negative integer (dimensions, batch, counts) as uint64.
inline uint64_t u64(const nlohmann::json& v) {
  return v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
}

inline std::string join_sorted(std::vector<std::string> names) {
  std::sort(names.begin(), names.end());
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return "[" + out + "]";
}

}  // namespace rstr::validate
