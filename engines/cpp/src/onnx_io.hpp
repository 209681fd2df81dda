// Internal: an ONNX graph's inputs, outputs and external-data files, read from the protobuf
// wire format without ONNX or ONNX Runtime (the same reader as engines/onnx_io.py).
#pragma once

#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <variant>
#include <vector>

namespace rstr::onnx_io {

/// A dimension: a number, a name, or unknown (std::monostate).
using Dim = std::variant<std::monostate, int64_t, std::string>;

struct GraphTensor {
  std::string name;
  std::string dtype;  // the manifest's spelling ("float32", "int64", ...), else "onnx type N"
  std::vector<Dim> shape;
};

struct GraphIO {
  std::vector<GraphTensor> inputs;
  std::vector<GraphTensor> outputs;
  std::set<std::string> initializers;
  std::set<std::string> external_files;  // `location` of every initializer kept in external data
};

/// Reads the model in `path`; throws FormatError (a std::runtime_error) when it is not one.
GraphIO read_graph_io(const std::filesystem::path& path);

class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace rstr::onnx_io
