// See onnx_io.hpp.  Field numbers from onnx/onnx.proto: ModelProto.graph (7); GraphProto.initializer
// (5), input (11), output (12); ValueInfoProto.name (1), type (2); TypeProto.tensor_type (1);
// TypeProto.Tensor.elem_type (1), shape (2); TensorShapeProto.dim (1); Dimension.dim_value (1),
// dim_param (2); TensorProto.name (8), external_data (13); StringStringEntryProto.key (1), value (2).
// Weights and nodes are skipped by their length, never read.
#include "onnx_io.hpp"

#include <fstream>
#include <map>
#include <stdexcept>

namespace rstr::onnx_io {
namespace {

/// One field of a message: a varint value, or the [start, end) span of a length-delimited value.
struct Field {
  uint64_t number = 0;
  int wire = 0;
  uint64_t value = 0;
  uint64_t start = 0, end = 0;
};

class Reader {
 public:
  explicit Reader(const std::filesystem::path& path) : in_(path, std::ios::binary) {
    if (!in_) throw FormatError("cannot open the file");
    std::error_code ec;
    size_ = std::filesystem::file_size(path, ec);
    if (ec) throw FormatError("cannot read the file size");
    if (size_ == 0) throw FormatError("the file is empty");
  }

  uint64_t size() const { return size_; }

  /// The fields of the message in [start, end).
  std::vector<Field> fields(uint64_t start, uint64_t end) {
    std::vector<Field> out;
    uint64_t pos = start;
    seek(pos);
    while (pos < end) {
      Field f;
      const uint64_t key = varint(pos, end);
      f.number = key >> 3;
      f.wire = static_cast<int>(key & 7);
      if (f.wire == 0) {
        f.value = varint(pos, end);
      } else if (f.wire == 2) {
        const uint64_t length = varint(pos, end);
        if (length > end - pos) throw FormatError("a field runs past the end of its message");
        f.start = pos;
        f.end = pos + length;
        pos += length;
        seek(pos);
      } else if (f.wire == 1 || f.wire == 5) {
        pos += f.wire == 1 ? 8 : 4;
        seek(pos);
        continue;
      } else {
        throw FormatError("unsupported protobuf wire type " + std::to_string(f.wire));
      }
      out.push_back(f);
    }
    if (pos != end) throw FormatError("a message runs past its end");
    return out;
  }

  std::string text(const Field& f) {
    std::string s(static_cast<size_t>(f.end - f.start), '\0');
    seek(f.start);
    if (!s.empty() && !in_.read(s.data(), static_cast<std::streamsize>(s.size()))) throw FormatError("truncated string");
    return s;
  }

 private:
  void seek(uint64_t pos) {
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(pos));
  }

  uint64_t varint(uint64_t& pos, uint64_t end) {
    uint64_t value = 0;
    for (int shift = 0;; shift += 7) {
      if (pos >= end || shift > 63) throw FormatError("truncated or overlong varint");
      const int byte = in_.get();
      if (byte == EOF) throw FormatError("truncated or overlong varint");
      ++pos;
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (byte < 0x80) return value;
    }
  }

  std::ifstream in_;
  uint64_t size_ = 0;
};

std::string elem_type(uint64_t t) {
  static const std::map<uint64_t, std::string> names = {{1, "float32"}, {2, "uint8"},   {3, "int8"},
                                                        {6, "int32"},   {7, "int64"},   {9, "bool"},
                                                        {10, "float16"}, {11, "float64"}, {16, "bfloat16"}};
  auto it = names.find(t);
  return it != names.end() ? it->second : "onnx type " + std::to_string(t);
}

GraphTensor tensor(Reader& r, const Field& value_info) {
  GraphTensor t{"", "undefined", {}};
  for (const Field& f : r.fields(value_info.start, value_info.end)) {
    if (f.number == 1 && f.wire == 2) t.name = r.text(f);
    if (f.number != 2 || f.wire != 2) continue;
    for (const Field& type : r.fields(f.start, f.end)) {
      if (type.number != 1 || type.wire != 2) continue;  // tensor_type
      t.dtype = "undefined";
      t.shape.clear();
      for (const Field& tf : r.fields(type.start, type.end)) {
        if (tf.number == 1 && tf.wire == 0) t.dtype = elem_type(tf.value);
        if (tf.number != 2 || tf.wire != 2) continue;
        for (const Field& dim : r.fields(tf.start, tf.end)) {
          if (dim.number != 1 || dim.wire != 2) continue;
          Dim d;
          for (const Field& df : r.fields(dim.start, dim.end)) {
            if (df.number == 1 && df.wire == 0) d = static_cast<int64_t>(df.value);
            if (df.number == 2 && df.wire == 2) d = r.text(df);
          }
          t.shape.push_back(d);
        }
      }
    }
  }
  return t;
}

}  // namespace

GraphIO read_graph_io(const std::filesystem::path& path) {
  Reader r(path);
  GraphIO io;
  int graphs = 0;
  for (const Field& model : r.fields(0, r.size())) {
    if (model.number != 7 || model.wire != 2) continue;
    ++graphs;
    for (const Field& g : r.fields(model.start, model.end)) {
      if (g.wire != 2) continue;
      if (g.number == 11) io.inputs.push_back(tensor(r, g));
      if (g.number == 12) io.outputs.push_back(tensor(r, g));
      if (g.number != 5) continue;
      std::string name;
      std::optional<std::string> location;
      for (const Field& f : r.fields(g.start, g.end)) {
        if (f.number == 8 && f.wire == 2) name = r.text(f);
        if (f.number != 13 || f.wire != 2) continue;
        std::map<uint64_t, std::string> entry;
        for (const Field& e : r.fields(f.start, f.end))
          if (e.wire == 2) entry[e.number] = r.text(e);
        if (entry.count(1) && entry[1] == "location") location = entry.count(2) ? entry[2] : "";
      }
      io.initializers.insert(name);
      if (location) io.external_files.insert(*location);
    }
  }
  if (graphs != 1) throw FormatError(graphs == 0 ? "no graph in the model" : "more than one graph in the model");
  return io;
}

}  // namespace rstr::onnx_io
