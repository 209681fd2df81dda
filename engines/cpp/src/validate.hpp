// Internal: the rules of a bundle that its JSON Schema cannot state (engines/validate.py has the
// same rules, in the same order, in the same words).
#pragma once

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

}  // namespace rstr::validate
