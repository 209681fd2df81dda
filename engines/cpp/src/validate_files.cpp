// See validate.hpp.  The second and third layers of engines/validate.py, rule for rule: the listed
// files (plain relative paths, no symbolic links, sizes, OpenSSL SHA-256) and the ONNX graph files.
// The first layer, the document's rules, is in validate.cpp.  Change both readers together (the
// shared bad-bundle corpus in tests/bad_bundles.py runs through both).
#include "validate.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <fstream>
#include <map>
#include <memory>
#include <variant>

#include <openssl/evp.h>

#include "onnx_io.hpp"

namespace rstr::validate {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Problem = std::optional<std::string>;

// ------------------------------------------------------------------------------------- files
Problem entry_problem(const std::string& name) {
  if (name.empty()) return std::string("files has an empty path");
  const std::string quoted = "'" + name + "'";
  if (name.front() == '/') return "files entry " + quoted + " is an absolute path; entries must be relative to the bundle";
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t slash; (slash = name.find('/', start)) != std::string::npos; start = slash + 1)
    parts.push_back(name.substr(start, slash - start));
  parts.push_back(name.substr(start));
  if (std::find(parts.begin(), parts.end(), "..") != parts.end())
    return "files entry " + quoted + " has a '..' component; entries must stay inside the bundle";
  const bool odd = std::any_of(parts.begin(), parts.end(), [](const std::string& p) { return p.empty() || p == "."; });
  if (odd || name.find('\\') != std::string::npos || name.find('\0') != std::string::npos)
    return "files entry " + quoted + " is not a plain relative path (no empty, '.' or backslash components)";
  return std::nullopt;
}

/// Every component is looked at with lstat: a symbolic link anywhere is refused.
Problem member_problem(const fs::path& dir, const std::string& name) {
  fs::path path = dir;
  struct stat st {};
  size_t start = 0;
  while (true) {
    const size_t slash = name.find('/', start);
    path /= name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (::lstat(path.c_str(), &st) != 0) return "file '" + name + "' listed in manifest.json is missing";
    if (S_ISLNK(st.st_mode)) return "file '" + name + "' is or lies under a symbolic link; bundles hold plain files";
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  if (!S_ISREG(st.st_mode)) return "file '" + name + "' listed in manifest.json is missing";
  return std::nullopt;
}

std::string sha256_hex(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BundleError("cannot read " + path.string());
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("OpenSSL: cannot initialise SHA-256");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0 && EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(in.gcount())) != 1)
      throw std::runtime_error("OpenSSL: SHA-256 update failed");
  }
  if (in.bad()) throw BundleError("error while reading " + path.string());
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md.data(), &len) != 1) throw std::runtime_error("OpenSSL: SHA-256 final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// ------------------------------------------------------------------------------------ graphs
std::string dim_text(const onnx_io::Dim& d) {
  if (std::holds_alternative<int64_t>(d)) return std::to_string(std::get<int64_t>(d));
  if (std::holds_alternative<std::string>(d)) return std::get<std::string>(d);
  return "?";
}

std::string dims_text(const std::vector<onnx_io::Dim>& dims) {
  std::string out;
  for (const auto& d : dims) out += (out.empty() ? "" : ", ") + dim_text(d);
  return "[" + out + "]";
}

/// See _dims_fit in engines/validate.py.
bool dims_fit(const std::vector<onnx_io::Dim>& graph, const json& manifest, uint64_t batch) {
  if (graph.size() != manifest.size()) return false;
  for (size_t axis = 0; axis < graph.size(); ++axis) {
    if (!std::holds_alternative<int64_t>(graph[axis])) continue;
    const int64_t g = std::get<int64_t>(graph[axis]);
    const json& m = manifest[axis];
    if (is_int(m) && g >= 0 && static_cast<uint64_t>(g) == u64(m)) continue;
    if (axis == 0 && m.is_string() && g >= 0 && (static_cast<uint64_t>(g) == batch || static_cast<uint64_t>(g) == 2 * batch))
      continue;
    return false;
  }
  return true;
}

}  // namespace

std::vector<std::string> file_problems(const fs::path& dir, const std::map<std::string, FileEntry>& files, Verify verify) {
  std::vector<std::string> problems;
  for (const auto& [name, entry] : files) {  // std::map: name order
    Problem problem = entry_problem(name);
    if (!problem) problem = member_problem(dir, name);
    if (!problem && verify == Verify::Checksums) {
      const fs::path path = dir / name;
      std::error_code ec;
      const uint64_t size = fs::file_size(path, ec);
      if (ec) {
        problem = "file '" + name + "' listed in manifest.json is missing";
      } else if (entry.bytes && size != *entry.bytes) {
        problem = "file '" + name + "' has " + std::to_string(size) + " bytes, manifest.json says " +
                  std::to_string(*entry.bytes) + " (corrupt or truncated; re-export or re-copy the bundle)";
      } else {
        std::string actual;
        try {
          actual = sha256_hex(path);
        } catch (const BundleError&) {
          problems.push_back("file '" + name + "' cannot be read");
          continue;
        }
        const std::string want = lower(entry.sha256);
        if (actual != want)
          problem = "file '" + name + "' fails its checksum (sha256 " + actual.substr(0, 12) + "..., manifest.json says " +
                    want.substr(0, 12) + "...; corrupt or modified: re-export or re-copy the bundle)";
      }
    }
    if (problem) problems.push_back(*problem);
  }
  return problems;
}

std::optional<std::string> graph_file_problem(const fs::path& dir, const std::string& name, const json& graph,
                                              const std::map<std::string, FileEntry>& files, int64_t batch) {
  const std::string file = graph.at("file").get<std::string>();
  const std::string at = "graphs." + name + ": " + file;
  onnx_io::GraphIO io;
  try {
    io = onnx_io::read_graph_io(dir / file);
  } catch (const onnx_io::FormatError& e) {
    return at + " is not a readable ONNX model (" + e.what() + ")";
  }
  std::vector<onnx_io::GraphTensor> inputs;
  for (const auto& t : io.inputs)
    if (!io.initializers.count(t.name)) inputs.push_back(t);
  const std::pair<const char*, const std::vector<onnx_io::GraphTensor>*> kinds[] = {{"inputs", &inputs},
                                                                                    {"outputs", &io.outputs}};
  for (const auto& [kind, actual] : kinds) {
    std::map<std::string, const onnx_io::GraphTensor*> have;
    for (const auto& t : *actual) have[t.name] = &t;
    std::vector<std::string> have_names, declared_names;
    for (const auto& [n, _] : have) have_names.push_back(n);
    for (const auto& d : graph.at(kind)) declared_names.push_back(d.at("name").get<std::string>());
    std::vector<std::string> sorted_declared = declared_names;
    std::sort(sorted_declared.begin(), sorted_declared.end());
    if (have_names != sorted_declared)
      return at + " has " + kind + " " + join_sorted(have_names) + " but the manifest describes " + join_sorted(declared_names);
    const std::string one = std::string(kind).substr(0, std::string(kind).size() - 1);
    for (const auto& d : graph.at(kind)) {
      const std::string tname = d.at("name").get<std::string>();
      const onnx_io::GraphTensor& t = *have.at(tname);
      const std::string dtype = d.at("dtype").get<std::string>();
      if (t.dtype != dtype)
        return at + " " + one + " '" + tname + "' is " + t.dtype + " in the graph but " + dtype + " in the manifest";
      if (!dims_fit(t.shape, d.at("shape"), static_cast<uint64_t>(batch)))
        return at + " " + one + " '" + tname + "' has shape " + dims_text(t.shape) + " in the graph but " +
               shape_text(d.at("shape")) + " in the manifest";
    }
  }
  for (const auto& location : io.external_files)  // std::set: sorted
    if (!files.count(location)) return at + " keeps weights in '" + location + "', which is not listed in files";
  return std::nullopt;
}

}  // namespace rstr::validate
