// See npy.hpp.  Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
#include "npy.hpp"

#include "atomic_file.hpp"

#include <cstring>
#include <fstream>

namespace rstr::npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

bool little_endian_host() {
  const uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

/// The text after `'key':` in the header dict, with leading spaces skipped.
std::string after_key(const std::string& header, const std::string& key, const std::string& file) {
  const size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw InputError(file + ": not a valid .npy file (no '" + key + "' in its header)");
  size_t p = header.find(':', at);
  if (p == std::string::npos) throw InputError(file + ": not a valid .npy file (bad header)");
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  return header.substr(p);
}

}  // namespace

Tensor read(const std::filesystem::path& path) {
  const std::string file = path.string();
  if (!little_endian_host()) throw Error("reading .npy files needs a little-endian machine");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot open " + file);

  char magic[kMagicLen];
  unsigned char version[2];
  if (!in.read(magic, kMagicLen) || std::memcmp(magic, kMagic, kMagicLen) != 0 ||
      !in.read(reinterpret_cast<char*>(version), 2))
    throw InputError(file + ": not a .npy file (save it with numpy.save)");
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) throw InputError(file + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8);
  } else if (version[0] == 2 || version[0] == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) throw InputError(file + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw InputError(file + ": .npy format version " + std::to_string(version[0]) + " is not supported");
  }
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) throw InputError(file + ": truncated .npy header");

  // {'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 8, 8), }
  const std::string descr_text = after_key(header, "descr", file);
  const size_t q = descr_text.find('\'', 1);
  if (descr_text.empty() || descr_text[0] != '\'' || q == std::string::npos) throw InputError(file + ": bad 'descr' in .npy header");
  const std::string descr = descr_text.substr(1, q - 1);
  DType dtype;
  if (descr == "<f4") {
    dtype = DType::Float32;
  } else if (descr == "<i8") {
    dtype = DType::Int64;
  } else {
    throw InputError(file + ": dtype '" + descr + "' is not supported; save float32 ('<f4', e.g. x.astype(np.float32)) or int64 ('<i8')");
  }
  if (after_key(header, "fortran_order", file).rfind("False", 0) != 0)
    throw InputError(file + ": Fortran-order arrays are not supported; save np.ascontiguousarray(x)");
  const std::string shape_text = after_key(header, "shape", file);
  const size_t close = shape_text.find(')');
  if (shape_text.empty() || shape_text[0] != '(' || close == std::string::npos) throw InputError(file + ": bad 'shape' in .npy header");
  std::vector<int64_t> shape;
  std::string dims = shape_text.substr(1, close - 1);
  size_t pos = 0;
  while (pos < dims.size()) {
    size_t comma = dims.find(',', pos);
    if (comma == std::string::npos) comma = dims.size();
    const std::string item = dims.substr(pos, comma - pos);
    if (item.find_first_not_of(' ') != std::string::npos) {
      try {
        shape.push_back(std::stoll(item));
      } catch (const std::exception&) {
        throw InputError(file + ": bad 'shape' in .npy header");
      }
    }
    pos = comma + 1;
  }

  // The data must be in the file: this also bounds the allocation below by the file's size.
  std::error_code ec;
  const uint64_t available = std::filesystem::file_size(path, ec) - static_cast<uint64_t>(in.tellg());
  const uint64_t item = dtype == DType::Float32 ? sizeof(float) : sizeof(int64_t);
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d < 0) throw InputError(file + ": bad 'shape' in .npy header");
    if (d != 0 && count > available / item / static_cast<uint64_t>(d))
      throw InputError(file + ": truncated .npy data (its header promises more values than the file holds)");
    count *= static_cast<uint64_t>(d);
  }
  if (ec || count * item > available)
    throw InputError(file + ": truncated .npy data (expected " + std::to_string(count) + " values)");
  if (dtype == DType::Float32) {
    std::vector<float> v(count);
    if (!in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(float))))
      throw InputError(file + ": truncated .npy data (expected " + std::to_string(count) + " values)");
    return Tensor::float32(std::move(shape), std::move(v));
  }
  std::vector<int64_t> v(count);
  if (!in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(int64_t))))
    throw InputError(file + ": truncated .npy data (expected " + std::to_string(count) + " values)");
  return Tensor::int64(std::move(shape), std::move(v));
}

void write(const std::filesystem::path& path, const Tensor& tensor) {
  if (!little_endian_host()) throw Error("writing .npy files needs a little-endian machine");
  // Python tuple syntax: "()", "(3,)", "(1, 4, 8, 8)".
  std::string shape = "(";
  for (size_t i = 0; i < tensor.shape().size(); ++i) shape += (i ? ", " : "") + std::to_string(tensor.shape()[i]);
  shape += tensor.shape().size() == 1 ? ",)" : ")";
  std::string header = std::string("{'descr': '") + (tensor.dtype() == DType::Float32 ? "<f4" : "<i8") +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
  const size_t total = kMagicLen + 4 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';

  const char version[2] = {1, 0};
  const char len[2] = {static_cast<char>(header.size() & 0xff), static_cast<char>((header.size() >> 8) & 0xff)};
  io::write_atomically(path, [&](std::FILE* out) {
    std::fwrite(kMagic, 1, kMagicLen, out);
    std::fwrite(version, 1, 2, out);
    std::fwrite(len, 1, 2, out);
    std::fwrite(header.data(), 1, header.size(), out);
    if (tensor.dtype() == DType::Float32)
      std::fwrite(tensor.f32().data(), sizeof(float), tensor.f32().size(), out);
    else
      std::fwrite(tensor.i64().data(), sizeof(int64_t), tensor.i64().size(), out);
  });
}

}  // namespace rstr::npy
