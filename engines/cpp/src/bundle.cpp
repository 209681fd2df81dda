// Bundle::open: read manifest.json strictly (nlohmann-json), validate it against
// engines/schemas/bundle.schema.json and the rules a schema cannot state (validate.cpp), then
// check every listed file and every graph file -- the same checks, in the same order and words,
// as the Python reader (engines/bundle.py, engines/validate.py).
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "rstr/runtime.hpp"
#include "schema.hpp"
#include "validate.hpp"

namespace rstr {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr uint64_t kMaxManifestBytes = 64ULL << 20;
constexpr int kMaxDepth = 100;  // nested arrays/objects, as rstr._io.MAX_JSON_DEPTH

DType parse_dtype(const json& v) { return v == "int64" ? DType::Int64 : DType::Float32; }

/// Integers stay; a symbolic axis 0 ("batch", "batch2") becomes kDynamic (the rules allow no other).
std::vector<int64_t> parse_shape(const json& shape) {
  std::vector<int64_t> out;
  for (const auto& d : shape) out.push_back(d.is_string() ? TensorInfo::kDynamic : d.get<int64_t>());
  return out;
}

TensorInfo parse_tensor(const json& t) {
  return TensorInfo{t.at("name").get<std::string>(), parse_dtype(t.at("dtype")), parse_shape(t.at("shape"))};
}

GraphInfo parse_graph(const json& g) {
  GraphInfo info;
  info.file = g.at("file").get<std::string>();
  for (const auto& t : g.at("inputs")) info.inputs.push_back(parse_tensor(t));
  for (const auto& t : g.at("outputs")) info.outputs.push_back(parse_tensor(t));
  return info;
}

/// A plan coefficient: one number, or [current, previous, ...] for a multistep update (schema-checked).
void read_coefficients(const json& v, float& current, std::vector<float>& past) {
  if (!v.is_array()) {
    current = v.get<float>();
    return;
  }
  current = v.at(0).get<float>();
  for (size_t i = 1; i < v.size(); ++i) past.push_back(v.at(i).get<float>());
}

std::string optional_text(const json& e, const char* key) { return e.contains(key) ? e.at(key).get<std::string>() : ""; }

/// Reads a valid manifest (schema and rules checked) into the runtime's structures.
Manifest read_manifest(const json& m) {
  Manifest man;
  man.family = m.at("family").get<std::string>();
  man.batch = m.at("batch").get<int64_t>();
  man.sample = parse_tensor(m.at("sample"));

  const json& cond = m.at("conditioning");
  for (const auto& t : cond.at("inputs")) {
    ConditioningInput c;
    c.info = parse_tensor(t);
    c.info.shape[0] = man.batch;
    const json& rule = cond.at("unconditional").at(c.info.name);
    c.unconditional = rule.is_object() ? UnconditionalKind::Fill : UnconditionalKind::Required;
    if (rule.is_object()) c.fill = rule.at("fill").get<double>();
    man.conditioning.push_back(std::move(c));
  }
  if (cond.contains("num_classes") && !cond.at("num_classes").is_null()) man.num_classes = cond.at("num_classes").get<int64_t>();

  const json& graphs = m.at("graphs");
  man.denoiser = parse_graph(graphs.at("denoiser"));
  man.step_guided = parse_graph(graphs.at("step_guided"));
  man.step_single = parse_graph(graphs.at("step_single"));

  const json& plan = m.at("plan");
  man.plan.init_noise_sigma = plan.at("init_noise_sigma").get<float>();
  for (const auto& s : plan.at("steps")) {
    Step step;
    step.index = s.at("index").get<int>();
    step.timestep = s.at("timestep").get<double>();
    step.model_timestep = s.at("model_timestep").get<float>();
    step.kind = s.at("guided").get<bool>() ? StepKind::Guided : StepKind::Single;
    if (step.kind == StepKind::Guided) step.scale = s.at("scale").get<float>();
    read_coefficients(s.at("coef_sample"), step.coef_sample, step.past_sample);
    read_coefficients(s.at("coef_eps"), step.coef_eps, step.past_eps);
    man.plan.history = std::max(man.plan.history, static_cast<int>(std::max(step.past_sample.size(), step.past_eps.size())));
    man.plan.steps.push_back(step);
  }

  if (m.contains("decoder") && !m.at("decoder").is_null()) {
    const json& d = m.at("decoder");
    const json& kind = d.at("kind");
    man.decoder.kind = kind == "pixels" ? DecoderKind::Pixels : kind == "vae" ? DecoderKind::Vae : DecoderKind::Other;
    man.decoder.channels = d.at("channels").get<int>();
    man.decoder.size = d.at("size").get<int>();
    man.decoder.lo = d.at("range")[0].get<float>();
    man.decoder.hi = d.at("range")[1].get<float>();
    if (man.decoder.kind == DecoderKind::Vae) man.decoder.graph = parse_graph(graphs.at(d.at("graph").get<std::string>()));
  }

  for (const auto& [name, e] : m.at("files").items()) {
    FileEntry entry;
    entry.sha256 = e.at("sha256").get<std::string>();
    if (e.contains("bytes") && !e.at("bytes").is_null()) entry.bytes = e.at("bytes").get<uint64_t>();
    man.files.emplace(name, std::move(entry));
  }
  if (m.contains("engines"))
    for (const auto& e : m.at("engines")) {
      EngineEntry entry{e.at("graph").get<std::string>(), e.at("file").get<std::string>(), optional_text(e, "tensorrt_version"),
                        optional_text(e, "compute_capability"),
                        e.contains("version_compatible") && e.at("version_compatible").get<bool>()};
      man.engines.push_back(std::move(entry));
    }
  return man;
}

/// Format and version first (a later version may change everything else), then the schema, then the rules.
void check_manifest(const json& root, const std::string& bundle) {
  const std::string at = "bundle " + bundle + ": manifest.json";
  if (!root.is_object()) throw BundleError(at + " must hold a JSON object (got " + schema::json_type(root) + ")");
  if (!root.contains("format")) throw BundleError(at + ": format is missing; this is not an rstr bundle");
  if (root.at("format") != Manifest::kFormat)
    throw BundleError(at + ": format is " + schema::dump(root.at("format")) + ", not \"" + Manifest::kFormat +
                      "\": this is not an rstr bundle");
  if (!root.contains("version")) throw BundleError(at + ": version is missing; this is not an rstr bundle");
  const json& version = root.at("version");
  if (!(version.is_number_integer() || version.is_number_unsigned()) || version != Manifest::kVersion)
    throw BundleError(at + ": version is " + schema::dump(version) + "; this runtime reads version " +
                      std::to_string(Manifest::kVersion) +
                      " (rebuild the bundle with a matching rstr-export, or use a matching runtime)");
  if (auto problem = schema::first_violation(root, schema::bundle_schema())) throw BundleError(at + ": " + *problem);
  if (auto problem = validate::document_problem(root)) throw BundleError(at + ": " + *problem);
}

/// manifest.json as strict JSON: at most 64 MiB, nesting at most kMaxDepth, numbers that fit a double.
json read_json(const fs::path& path, const std::string& bundle) {
  const std::string at = "bundle " + bundle + ": manifest.json";
  std::error_code ec;
  const uint64_t size = fs::file_size(path, ec);
  if (ec) throw BundleError(at + " cannot be read (" + ec.message() + ")");
  if (size > kMaxManifestBytes) throw BundleError(at + " is larger than 64 MiB; it is not a JSON file rstr wrote");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BundleError(at + " cannot be read");
  bool too_deep = false;
  const json::parser_callback_t depth = [&too_deep](int level, json::parse_event_t event, json&) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) && level >= kMaxDepth)
      too_deep = true;
    return !too_deep;
  };
  try {
    json root = json::parse(in, depth);
    if (too_deep) throw BundleError(at + " is not valid JSON (nested deeper than " + std::to_string(kMaxDepth) + " levels)");
    return root;
  } catch (const json::exception& e) {
    if (too_deep) throw BundleError(at + " is not valid JSON (nested deeper than " + std::to_string(kMaxDepth) + " levels)");
    std::string detail = e.what();  // may quote the offending bytes: keep the line printable ASCII
    for (char& c : detail)
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
    throw BundleError(at + " is not valid JSON (" + detail + ")");
  }
}

}  // namespace

Bundle::Bundle(std::filesystem::path dir, Manifest manifest) : dir_(std::move(dir)), manifest_(std::move(manifest)) {}

Bundle Bundle::open(const std::filesystem::path& dir, Verify verify) {
  const std::string name = dir.string();
  std::error_code ec;
  if (!fs::exists(dir, ec)) throw BundleError("bundle " + name + " does not exist");
  if (!fs::is_directory(dir, ec)) throw BundleError("bundle " + name + " is not a directory");
  const fs::path manifest_path = dir / "manifest.json";
  if (fs::is_symlink(fs::symlink_status(manifest_path, ec)))
    throw BundleError("bundle " + name + ": manifest.json is a symbolic link; bundles hold plain files");
  if (!fs::is_regular_file(manifest_path, ec))
    throw BundleError("bundle " + name + " has no manifest.json (is it a bundle directory?)");
  const json root = read_json(manifest_path, name);
  check_manifest(root, name);
  Manifest manifest = read_manifest(root);

  // Every file problem at once, on one line; then the graph files against the manifest.
  const std::vector<std::string> problems = validate::file_problems(dir, manifest.files, verify);
  if (!problems.empty()) {
    std::string msg = "bundle " + name + ": " + problems.front();
    for (size_t i = 1; i < problems.size(); ++i) msg += "; " + problems[i];
    throw BundleError(msg);
  }
  std::vector<std::string> graphs = {"denoiser", "step_guided", "step_single"};  // the plan's, then the others by name
  for (const auto& [graph, _] : root.at("graphs").items())
    if (std::find(graphs.begin(), graphs.begin() + 3, graph) == graphs.begin() + 3) graphs.push_back(graph);
  for (const auto& graph : graphs)
    if (auto problem = validate::graph_file_problem(dir, graph, root.at("graphs").at(graph), manifest.files, manifest.batch))
      throw BundleError("bundle " + name + ": " + *problem);
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
