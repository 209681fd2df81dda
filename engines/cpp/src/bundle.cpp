// Bundle::open: parse manifest.json (nlohmann-json), validate it against engines/schemas/bundle.schema.json,
// and check it against docs/bundle.md.
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "rstr/runtime.hpp"
#include "schema.hpp"

namespace rstr {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

/// A JSON value and where it sits in manifest.json ("plan.steps[3].coef_eps"), so that a
/// missing or mistyped field is reported by name instead of by nlohmann's generic message.
class Field {
 public:
  Field(const json& value, std::string where, const std::string& bundle) : v_(value), where_(std::move(where)), bundle_(bundle) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw BundleError("bundle " + bundle_ + ": manifest.json: " + where_ + " " + what);
  }

  const json& raw() const { return v_; }
  const std::string& where() const { return where_; }
  bool is_null() const { return v_.is_null(); }

  bool has(const char* key) const { return v_.is_object() && v_.contains(key); }
  Field at(const char* key) const {
    if (!v_.is_object()) fail("must be an object (got " + std::string(v_.type_name()) + ")");
    auto it = v_.find(key);
    if (it == v_.end()) Field(v_, join(key), bundle_).fail("is missing");
    return Field(*it, join(key), bundle_);
  }
  Field item(size_t i) const {
    if (i >= size()) fail("has no item " + std::to_string(i));
    return Field(v_[i], where_ + "[" + std::to_string(i) + "]", bundle_);
  }

  size_t size() const {
    if (!v_.is_array()) fail("must be an array (got " + std::string(v_.type_name()) + ")");
    return v_.size();
  }
  std::string str() const {
    if (!v_.is_string()) fail("must be a string (got " + std::string(v_.type_name()) + ")");
    return v_.get<std::string>();
  }
  double number() const {
    if (!v_.is_number()) fail("must be a number (got " + std::string(v_.type_name()) + ")");
    return v_.get<double>();
  }
  int64_t integer() const {
    if (!v_.is_number_integer()) fail("must be an integer (got " + std::string(v_.type_name()) + ")");
    return v_.get<int64_t>();
  }
  bool boolean() const {
    if (!v_.is_boolean()) fail("must be true or false (got " + std::string(v_.type_name()) + ")");
    return v_.get<bool>();
  }

 private:
  std::string join(const char* key) const { return where_.empty() ? key : where_ + "." + key; }
  const json& v_;
  std::string where_;
  const std::string& bundle_;
};

DType parse_dtype(const Field& f) {
  const std::string s = f.str();
  if (s == "float32") return DType::Float32;
  if (s == "int64") return DType::Int64;
  f.fail("is '" + s + "'; this runtime reads float32 and int64 tensors");
}

/// Integers stay; a symbolic dimension ("batch", "2*batch") becomes kDynamic, allowed in
/// dimension 0 only (the batch rows are the one thing the plan changes).
std::vector<int64_t> parse_shape(const Field& f) {
  std::vector<int64_t> shape;
  for (size_t i = 0; i < f.size(); ++i) {
    Field d = f.item(i);
    if (d.raw().is_string()) {
      if (i != 0) d.fail("is symbolic; only the batch dimension (0) may be");
      shape.push_back(TensorInfo::kDynamic);
    } else {
      int64_t n = d.integer();
      if (n < 0) d.fail("is negative");
      shape.push_back(n);
    }
  }
  return shape;
}

TensorInfo parse_tensor(const Field& f) {
  return TensorInfo{f.at("name").str(), parse_dtype(f.at("dtype")), parse_shape(f.at("shape"))};
}

GraphInfo parse_graph(const Field& f) {
  GraphInfo g;
  g.file = f.at("file").str();
  Field in = f.at("inputs"), out = f.at("outputs");
  for (size_t i = 0; i < in.size(); ++i) g.inputs.push_back(parse_tensor(in.item(i)));
  for (size_t i = 0; i < out.size(); ++i) g.outputs.push_back(parse_tensor(out.item(i)));
  return g;
}

/// The names the plan walk binds (docs/bundle.md, "Graphs") must be in the graph.
void require_io(const Field& graph, const GraphInfo& g, const std::vector<std::string>& inputs,
                const std::vector<std::string>& outputs) {
  for (const auto& name : inputs)
    if (!g.find_input(name)) graph.fail("has no input '" + name + "'");
  for (const auto& name : outputs)
    if (!g.find_output(name)) graph.fail("has no output '" + name + "'");
}

/// Dimension 0 resolved to `rows`; every other dimension must already be concrete.
std::vector<int64_t> resolve(const Field& where, std::vector<int64_t> shape, int64_t rows) {
  if (shape.empty()) where.fail("must have a batch dimension");
  if (shape[0] != TensorInfo::kDynamic && shape[0] != rows)
    where.fail("has " + std::to_string(shape[0]) + " rows but the bundle's batch is " + std::to_string(rows));
  shape[0] = rows;
  return shape;
}

float as_float(const Field& f) { return static_cast<float>(f.number()); }

/// A plan coefficient: one number, or [current, previous, ...] for a multistep update.
void parse_coefficients(const Field& f, float& current, std::vector<float>& past) {
  if (!f.raw().is_array()) {
    current = as_float(f);
    return;
  }
  if (f.size() == 0) f.fail("is empty; give one number or [current, previous, ...]");
  current = as_float(f.item(0));
  for (size_t i = 1; i < f.size(); ++i) past.push_back(as_float(f.item(i)));
}

Manifest parse_manifest(const json& root, const std::string& bundle) {
  Field m(root, "", bundle);
  if (!root.is_object()) m.fail("must hold a JSON object");

  // Format and version first: a future version may change everything below.
  const Field format = m.at("format");
  if (!format.raw().is_string() || format.str() != Manifest::kFormat)
    format.fail("is " + format.raw().dump() + ", not \"" + Manifest::kFormat + "\": this is not an rstr bundle");
  const Field version = m.at("version");
  if (!version.raw().is_number_integer() || version.integer() != Manifest::kVersion)
    version.fail("is " + version.raw().dump() + "; this runtime reads version " + std::to_string(Manifest::kVersion) +
                 " (rebuild the bundle with a matching rstr-export, or use a matching runtime)");

  // Then the shape of the whole document, against the schema the Python reader uses too.
  if (auto problem = schema::first_violation(root, schema::bundle_schema()))
    throw BundleError("bundle " + bundle + ": manifest.json: " + *problem);

  Manifest man;
  man.family = m.has("family") ? m.at("family").str() : "";
  man.batch = m.at("batch").integer();
  if (man.batch < 1) m.at("batch").fail("must be at least 1");

  man.sample = parse_tensor(m.at("sample"));
  if (man.sample.dtype != DType::Float32) m.at("sample").at("dtype").fail("must be float32");
  man.sample.shape = resolve(m.at("sample").at("shape"), man.sample.shape, man.batch);

  // Conditioning.
  const Field cond = m.at("conditioning");
  const Field cin = cond.at("inputs");
  const Field uncond = cond.at("unconditional");
  for (size_t i = 0; i < cin.size(); ++i) {
    ConditioningInput c;
    c.info = parse_tensor(cin.item(i));
    c.info.shape = resolve(cin.item(i).at("shape"), c.info.shape, man.batch);
    const Field u = uncond.at(c.info.name.c_str());
    if (u.raw().is_string() && u.str() == "required") {
      c.unconditional = UnconditionalKind::Required;
    } else if (u.raw().is_object()) {
      c.unconditional = UnconditionalKind::Fill;
      c.fill = u.at("fill").number();
    } else {
      u.fail("must be {\"fill\": value} or \"required\"");
    }
    man.conditioning.push_back(std::move(c));
  }
  if (cond.has("num_classes") && !cond.at("num_classes").is_null()) {
    man.num_classes = cond.at("num_classes").integer();
    if (*man.num_classes < 1) cond.at("num_classes").fail("must be at least 1");
  }

  // Graphs.
  const Field graphs = m.at("graphs");
  man.denoiser = parse_graph(graphs.at("denoiser"));
  man.step_guided = parse_graph(graphs.at("step_guided"));
  man.step_single = parse_graph(graphs.at("step_single"));
  std::vector<std::string> denoiser_inputs = {"sample", "timestep"};
  for (const auto& c : man.conditioning) denoiser_inputs.push_back(c.info.name);
  require_io(graphs.at("denoiser"), man.denoiser, denoiser_inputs, {"model_output"});
  require_io(graphs.at("step_guided"), man.step_guided, {"sample", "model_output", "scale", "coef_sample", "coef_eps"},
             {"next_sample", "next_sample_pair"});
  require_io(graphs.at("step_single"), man.step_single, {"sample", "model_output", "coef_sample", "coef_eps"},
             {"next_sample", "next_sample_pair"});
  const std::vector<int64_t>& out = man.denoiser.find_output("model_output")->shape;
  for (size_t d = 1; d < out.size(); ++d)
    if (out[d] == TensorInfo::kDynamic) graphs.at("denoiser").fail("output model_output must be concrete past dimension 0");
  if (out.empty()) graphs.at("denoiser").fail("output model_output must have a batch dimension");

  // Plan.
  const Field plan = m.at("plan");
  man.plan.init_noise_sigma = as_float(plan.at("init_noise_sigma"));
  const Field steps = plan.at("steps");
  if (steps.size() == 0) steps.fail("is empty");
  for (size_t i = 0; i < steps.size(); ++i) {
    const Field s = steps.item(i);
    Step step;
    step.index = s.has("index") ? static_cast<int>(s.at("index").integer()) : static_cast<int>(i);
    step.timestep = s.has("timestep") ? s.at("timestep").number() : 0.0;
    step.model_timestep = as_float(s.at("model_timestep"));
    step.kind = s.at("guided").boolean() ? StepKind::Guided : StepKind::Single;
    if (step.kind == StepKind::Guided) step.scale = as_float(s.at("scale"));
    parse_coefficients(s.at("coef_sample"), step.coef_sample, step.past_sample);
    parse_coefficients(s.at("coef_eps"), step.coef_eps, step.past_eps);
    man.plan.history = std::max(man.plan.history, static_cast<int>(std::max(step.past_sample.size(), step.past_eps.size())));
    if (s.has("batch")) {
      const int64_t rows = step.kind == StepKind::Guided ? 2 * man.batch : man.batch;
      if (s.at("batch").integer() != rows)
        s.at("batch").fail("is " + std::to_string(s.at("batch").integer()) + " but a " +
                           (step.kind == StepKind::Guided ? "guided" : "unguided") + " step runs " +
                           std::to_string(rows) + " rows");
    }
    man.plan.steps.push_back(step);
  }
  // The step graphs carry the history the updates read: history [batch, k, 2, ...] in, next_history out.
  for (const char* name : {"step_guided", "step_single"}) {
    const GraphInfo& g = std::string(name) == "step_guided" ? man.step_guided : man.step_single;
    const TensorInfo* h = g.find_input("history");
    const int64_t depth = h != nullptr && h->shape.size() >= 2 ? h->shape[1] : 0;
    if (depth != man.plan.history)
      graphs.at(name).fail("carries a history of " + std::to_string(depth) + " step(s) but the plan's updates use " +
                           std::to_string(man.plan.history) + "; rebuild the bundle");
    if (depth > 0 && !g.find_output("next_history")) graphs.at(name).fail("has no output 'next_history'");
  }

  // Decoder.
  if (m.has("decoder") && !m.at("decoder").is_null()) {
    const Field d = m.at("decoder");
    const std::string kind = d.at("kind").str();
    if (kind == "pixels") {
      man.decoder.kind = DecoderKind::Pixels;
      man.decoder.channels = static_cast<int>(d.at("channels").integer());
      man.decoder.size = static_cast<int>(d.at("size").integer());
      const Field range = d.at("range");
      if (range.size() != 2) range.fail("must be [lo, hi]");
      man.decoder.lo = as_float(range.item(0));
      man.decoder.hi = as_float(range.item(1));
      if (!(man.decoder.hi > man.decoder.lo)) range.fail("must have hi > lo");
    } else {
      man.decoder.kind = DecoderKind::Other;
    }
  }

  // Files and engines.
  const Field files = m.at("files");
  if (!files.raw().is_object()) files.fail("must be an object {path: {sha256, bytes}}");
  for (auto it = files.raw().begin(); it != files.raw().end(); ++it) {
    const Field e(it.value(), files.where() + "[\"" + it.key() + "\"]", bundle);
    FileEntry entry;
    entry.sha256 = e.at("sha256").str();
    if (e.has("bytes") && !e.at("bytes").is_null()) {
      const int64_t n = e.at("bytes").integer();
      if (n < 0) e.at("bytes").fail("is negative");
      entry.bytes = static_cast<uint64_t>(n);
    }
    man.files.emplace(it.key(), std::move(entry));
  }
  if (m.has("engines") && !m.at("engines").is_null()) {
    const Field engines = m.at("engines");
    for (size_t i = 0; i < engines.size(); ++i) {
      const Field e = engines.item(i);
      EngineEntry entry{e.at("graph").str(), e.at("file").str(), "", ""};
      if (e.has("tensorrt_version")) entry.tensorrt_version = e.at("tensorrt_version").raw().is_string()
                                                                  ? e.at("tensorrt_version").str()
                                                                  : e.at("tensorrt_version").raw().dump();
      if (e.has("compute_capability")) entry.compute_capability = e.at("compute_capability").raw().is_string()
                                                                      ? e.at("compute_capability").str()
                                                                      : e.at("compute_capability").raw().dump();
      man.engines.push_back(std::move(entry));
    }
  }

  // Everything the runtime loads must be covered by a checksum.
  const std::pair<const char*, const GraphInfo*> named[] = {
      {"denoiser", &man.denoiser}, {"step_guided", &man.step_guided}, {"step_single", &man.step_single}};
  for (const auto& [name, g] : named)
    if (!man.files.count(g->file))
      graphs.at(name).at("file").fail("'" + g->file + "' is not listed in files (it would be loaded unchecked)");
  for (size_t i = 0; i < man.engines.size(); ++i)
    if (!man.files.count(man.engines[i].file))
      m.at("engines").item(i).at("file").fail("'" + man.engines[i].file + "' is not listed in files");
  return man;
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

/// Empty when `relative` is a safe, existing file inside `dir` (checksum included); else the problem.
std::string check_file(const fs::path& dir, const std::string& relative, const FileEntry& entry, Verify verify) {
  const std::string quoted = "'" + relative + "'";
  if (relative.empty()) return "files has an empty path";
  const fs::path rel(relative);
  if (rel.is_absolute() || relative.front() == '/' || rel.has_root_name())
    return "files entry " + quoted + " is an absolute path; entries must be relative to the bundle";
  for (const auto& part : rel)
    if (part == "..") return "files entry " + quoted + " has a '..' component; entries must stay inside the bundle";
  const fs::path full = dir / rel;
  std::error_code ec;
  if (!fs::is_regular_file(full, ec)) return "file " + quoted + " listed in manifest.json is missing";
  // A symbolic link may still lead outside the bundle.
  const fs::path real = fs::weakly_canonical(full, ec);
  const fs::path root = fs::weakly_canonical(dir, ec);
  const auto mismatch = std::mismatch(root.begin(), root.end(), real.begin(), real.end());
  if (ec || mismatch.first != root.end()) return "file " + quoted + " resolves outside the bundle (" + real.string() + ")";
  if (verify == Verify::SkipChecksums) return "";
  const uint64_t size = fs::file_size(full, ec);
  if (entry.bytes && !ec && size != *entry.bytes)
    return "file " + quoted + " has " + std::to_string(size) + " bytes, manifest.json says " + std::to_string(*entry.bytes) +
           " (corrupt or truncated; re-export or re-copy the bundle)";
  const std::string actual = sha256_hex(full);
  if (actual != lower(entry.sha256))
    return "file " + quoted + " fails its checksum (sha256 " + actual.substr(0, 12) + "..., manifest.json says " +
           entry.sha256.substr(0, 12) + "...; corrupt or modified: re-export or re-copy the bundle)";
  return "";
}

}  // namespace

Bundle::Bundle(std::filesystem::path dir, Manifest manifest) : dir_(std::move(dir)), manifest_(std::move(manifest)) {}

Bundle Bundle::open(const std::filesystem::path& dir, Verify verify) {
  const std::string name = dir.string();
  std::error_code ec;
  if (!fs::exists(dir, ec)) throw BundleError("bundle " + name + " does not exist");
  if (!fs::is_directory(dir, ec)) throw BundleError("bundle " + name + " is not a directory");
  const fs::path manifest_path = dir / "manifest.json";
  if (!fs::is_regular_file(manifest_path, ec))
    throw BundleError("bundle " + name + " has no manifest.json (is it a bundle directory?)");
  std::ifstream in(manifest_path);
  json root;
  try {
    root = json::parse(in);
  } catch (const json::parse_error& e) {
    throw BundleError("bundle " + name + ": manifest.json is not valid JSON (byte " + std::to_string(e.byte) + ")");
  }
  Manifest manifest = parse_manifest(root, name);

  // Collect every file problem, then report them together on one line.
  std::vector<std::string> problems;
  for (const auto& [relative, entry] : manifest.files) {
    std::string problem = check_file(dir, relative, entry, verify);
    if (!problem.empty()) problems.push_back(std::move(problem));
  }
  if (!problems.empty()) {
    std::string msg = "bundle " + name + ": " + problems.front();
    for (size_t i = 1; i < problems.size(); ++i) msg += "; " + problems[i];
    throw BundleError(msg);
  }
  return Bundle(fs::absolute(dir), std::move(manifest));
}

const TensorInfo* GraphInfo::find_input(const std::string& name) const {
  for (const auto& t : inputs)
    if (t.name == name) return &t;
  return nullptr;
}

const TensorInfo* GraphInfo::find_output(const std::string& name) const {
  for (const auto& t : outputs)
    if (t.name == name) return &t;
  return nullptr;
}

const EngineEntry* Manifest::find_engine(const std::string& graph) const {
  for (const auto& e : engines)
    if (e.graph == graph) return &e;
  return nullptr;
}

namespace {
std::vector<float> padded(float current, const std::vector<float>& past, int history) {
  std::vector<float> out{current};
  out.insert(out.end(), past.begin(), past.end());
  out.resize(static_cast<size_t>(history) + 1, 0.0f);
  return out;
}
}  // namespace

std::vector<float> Step::sample_coefficients(int history) const { return padded(coef_sample, past_sample, history); }
std::vector<float> Step::eps_coefficients(int history) const { return padded(coef_eps, past_eps, history); }

int Plan::num_guided() const {
  int n = 0;
  for (const auto& s : steps) n += s.kind == StepKind::Guided;
  return n;
}

}  // namespace rstr
