// rstr C++ runtime: open an rstr bundle (docs/bundle.md, format "rstr.bundle" version 1)
// and walk its static step plan from initial noise and conditioning to final latents.
//
//   rstr::Bundle bundle = rstr::Bundle::open("bundles/dit");       // parses + verifies
//   rstr::Runner runner(bundle, rstr::Backend::OnnxRuntimeCpu);
//   rstr::Tensor latents = runner.run(noise, {{"class_labels", labels}});
//
// Every problem a caller can fix (a missing or corrupt bundle, an input of the wrong shape,
// a backend this build or machine lacks) is thrown as an rstr::Error subclass with one
// line of text.  The library never exits the process.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace rstr {

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// `text` with control and line-breaking characters escaped ("\x0a", "\u2028"), as rstr.errors.one_line does.
std::string one_line(const std::string& text);

/// Root of everything a caller can fix; what() is one line that names the value and the fix
/// (control characters that user input brought into it are escaped).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(one_line(what)) {}
};

/// A bundle that is missing, corrupt, unsafe or of an unknown format/version.
class BundleError : public Error {
 public:
  using Error::Error;
};

/// Noise or conditioning that does not fit the bundle (shape, dtype, class range, names).
class InputError : public Error {
 public:
  using Error::Error;
};

/// A backend that this build or this machine cannot provide, or that failed to run.
class BackendError : public Error {
 public:
  using Error::Error;
};

// ---------------------------------------------------------------------------------------
// Host tensors
// ---------------------------------------------------------------------------------------

enum class DType { Float32, Int64 };

/// "float32" / "int64", the spelling used in manifest.json.
const char* dtype_name(DType dtype);

/// A dense, row-major (C-order) host tensor of float32 or int64 values.
class Tensor {
 public:
  Tensor() = default;
  static Tensor float32(std::vector<int64_t> shape, std::vector<float> values);
  static Tensor int64(std::vector<int64_t> shape, std::vector<int64_t> values);
  /// A float32 / int64 tensor of `shape` filled with `value`.
  static Tensor filled(DType dtype, std::vector<int64_t> shape, double value);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const;

  /// The values; throws rstr::InputError when the tensor holds the other dtype.
  const std::vector<float>& f32() const;
  std::vector<float>& f32();
  const std::vector<int64_t>& i64() const;
  std::vector<int64_t>& i64();

 private:
  DType dtype_ = DType::Float32;
  std::vector<int64_t> shape_;
  std::vector<float> f32_;
  std::vector<int64_t> i64_;
};

/// "[2, 4, 8, 8]".
std::string shape_string(const std::vector<int64_t>& shape);

/// rstr's seeded noise (docs/seeding.md): float32 N(0, 1) of `shape` from `seed`, Philox4x32-10 bits
/// and Box-Muller normals -- the same numbers as Python's `rstr.engines.noise.standard_normal`,
/// `Pipeline(seed=)`, `rstr-export run --seed` and `rstr sample --seed`.
Tensor seeded_noise(uint64_t seed, const std::vector<int64_t>& shape);

/// Named conditioning tensors (manifest `conditioning.inputs`), each [B, ...].
using Conditioning = std::map<std::string, Tensor>;

// ---------------------------------------------------------------------------------------
// The manifest (docs/bundle.md)
// ---------------------------------------------------------------------------------------

/// One graph input or output.  A symbolic dimension ("batch", "2*batch", ...) is stored as
/// kDynamic; the runtimes resolve it from the plan (B or 2B rows).
struct TensorInfo {
  static constexpr int64_t kDynamic = -1;
  std::string name;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
};

struct GraphInfo {
  std::string file;  // relative to the bundle directory
  std::vector<TensorInfo> inputs;
  std::vector<TensorInfo> outputs;
  const TensorInfo* find_input(const std::string& name) const;
  const TensorInfo* find_output(const std::string& name) const;
};

/// How the unconditional rows of one conditioning input are obtained.
enum class UnconditionalKind {
  Fill,      // {"fill": value}: every element is `fill` (DiT's null class)
  Required,  // "required": the caller passes it (negative-prompt embeddings)
};

struct ConditioningInput {
  TensorInfo info;  // shape [B, ...] with B concrete (manifest "batch" resolved)
  UnconditionalKind unconditional = UnconditionalKind::Required;
  double fill = 0.0;  // when unconditional == Fill
};

enum class StepKind {
  Guided,  // denoiser at 2B rows [cond; uncond], then step_guided
  Single,  // denoiser at B conditional rows, then step_single
};

struct Step {
  int index = 0;
  double timestep = 0.0;        // the scheduler's timestep (informational)
  float model_timestep = 0.0f;  // the value the denoiser receives
  StepKind kind = StepKind::Single;
  float scale = 0.0f;  // guidance scale; meaningful for Guided steps only
  // The scheduler update, linear in the current and past samples and model outputs (docs/bundle.md):
  //   x_next = coef_sample * x + coef_eps * eps + sum_d past_sample[d] * x_{i-1-d} + past_eps[d] * eps_{i-1-d}
  float coef_sample = 0.0f;
  float coef_eps = 0.0f;
  std::vector<float> past_sample;  // empty for one-step schedulers (DDIM, flow-matching Euler)
  std::vector<float> past_eps;
  /// [current, previous, ...] zero-padded to `history` + 1 entries: the step graphs' coef inputs.
  std::vector<float> sample_coefficients(int history) const;
  std::vector<float> eps_coefficients(int history) const;
};

struct Plan {
  float init_noise_sigma = 1.0f;
  int history = 0;  // past (sample, model output) pairs the updates read; the step graphs carry them
  std::vector<Step> steps;
  int num_guided() const;
};

enum class DecoderKind {
  None,    // the bundle returns latents only
  Pixels,  // the latents are the image: image = clip((x - lo) / (hi - lo), 0, 1)
  Vae,     // the graph `decoder.graph` (vae_decoder) maps the final latents to images in [0, 1]
  Other,   // a decoder this runtime does not implement: it returns latents
};

struct Decoder {
  DecoderKind kind = DecoderKind::None;
  int channels = 0;
  int size = 0;
  float lo = -1.0f;
  float hi = 1.0f;
  GraphInfo graph;  // Vae: input "latents" [N, ...sample], output "images" [N, H, W, C]
};

struct FileEntry {
  std::string sha256;          // lowercase hex
  std::optional<uint64_t> bytes;
};

/// A TensorRT engine for one graph (only in bundles built for TensorRT).
struct EngineEntry {
  std::string graph;  // "denoiser", "step_guided" or "step_single"
  std::string file;
  std::string tensorrt_version;
  std::string compute_capability;
  bool version_compatible = false;  // embeds TensorRT's lean runtime as host code (see EngineHostCode)
};

struct Manifest {
  static constexpr const char* kFormat = "rstr.bundle";
  static constexpr int kVersion = 1;

  std::string family;
  int64_t batch = 1;  // B
  TensorInfo sample;  // [B, ...], concrete
  GraphInfo denoiser;
  GraphInfo step_guided;
  GraphInfo step_single;
  std::vector<ConditioningInput> conditioning;
  std::optional<int64_t> num_classes;  // when set, integer conditioning lies in [0, num_classes)
  Plan plan;
  Decoder decoder;
  std::map<std::string, FileEntry> files;
  std::vector<EngineEntry> engines;

  const EngineEntry* find_engine(const std::string& graph) const;
};

// ---------------------------------------------------------------------------------------
// Bundle and runner
// ---------------------------------------------------------------------------------------

/// Whether Bundle::open hashes every file (the default) or trusts the checksums.
enum class Verify { Checksums, SkipChecksums };

/// An opened bundle: the parsed manifest and the directory it came from.
class Bundle {
 public:
  /// Parses `dir/manifest.json` and checks it as the Python reader does (docs/bundle.md): format
  /// and version, the JSON Schema, the rules a schema cannot state (plan, shapes, finite numbers,
  /// graph descriptions; every graph and engine file listed in `files`), every `files` entry a
  /// plain relative path inside the bundle with no symbolic link that exists (with its size and
  /// sha256, unless Verify::SkipChecksums), and every ONNX graph's inputs and outputs against the
  /// manifest.  Throws rstr::BundleError with one line.
  static Bundle open(const std::filesystem::path& dir, Verify verify = Verify::Checksums);

  const std::filesystem::path& dir() const { return dir_; }
  const Manifest& manifest() const { return manifest_; }
  /// Absolute path of a file listed in the manifest.
  std::filesystem::path path(const std::string& relative) const { return dir_ / relative; }

 private:
  Bundle(std::filesystem::path dir, Manifest manifest);
  std::filesystem::path dir_;
  Manifest manifest_;
};

enum class Backend {
  OnnxRuntimeCpu,   // always available
  OnnxRuntimeCuda,  // needs a build with -DRSTR_WITH_CUDA=ON and a CUDA build of ONNX Runtime
  TensorRT,         // needs a build that found TensorRT, and engines in the bundle
};

/// "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt".
const char* backend_name(Backend backend);

/// Whether this build contains `backend` (not whether the machine can run it).
bool backend_compiled(Backend backend);

/// Whether TensorRT may run host code embedded in an engine.  Version-compatible engines embed
/// TensorRT's lean runtime, which runs when the engine loads; a bundle is hashed but not signed,
/// so Allow says that you trust the bundle's author as you would trust a program from them.
enum class EngineHostCode {
  Refuse,  // default: a version-compatible engine is refused (BackendError) before it is loaded
  Allow,   // trust the bundle's author: let version-compatible engines run their host code
};

struct RunnerOptions {
  int device_id = 0;     // CUDA device (OnnxRuntimeCuda, TensorRT)
  int cpu_threads = 0;   // ONNX Runtime intra-op threads; 0 = ONNX Runtime's default
  EngineHostCode engine_host_code = EngineHostCode::Refuse;  // TensorRT only
};

/// Loads a bundle's graphs on one backend and walks its plan ("Walking the plan" in
/// docs/bundle.md).  Not thread-safe: use one Runner per thread.
class Runner {
 public:
  Runner(const Bundle& bundle, Backend backend, RunnerOptions options = {});
  ~Runner();
  Runner(Runner&&) noexcept;
  Runner& operator=(Runner&&) noexcept;
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  /// noise: float32 [B, ...] (the manifest's `sample.shape`), drawn from N(0, 1);
  /// cond: every input of `conditioning.inputs`, [B, ...];
  /// uncond: the unconditional rows; needed for inputs marked "required" when the plan has
  ///   guided steps, optional for "fill" inputs (given rows replace the fill value).
  /// Returns the final latents, float32 [B, ...].  Throws rstr::InputError on bad inputs.
  Tensor run(const Tensor& noise, const Conditioning& cond, const Conditioning& uncond = {});

  /// Images float32 [B, H, W, C] in [0, 1] from final latents [B, ...] by the bundle's decoder:
  /// the pixels rule, or the vae_decoder graph on ONNX Runtime (CUDA for the cuda and tensorrt
  /// backends in a CUDA build, else the CPU).  Throws rstr::InputError when the bundle has none.
  Tensor decode(const Tensor& latents);

  Backend backend() const { return backend_; }
  const Manifest& manifest() const { return manifest_; }

  /// Internal interfaces implemented by each backend (see src/executor.hpp).
  class Executor;
  class GraphSession;

 private:
  Backend backend_;
  Manifest manifest_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<GraphSession> decoder_;  // DecoderKind::Vae only
};

/// Checks `noise` and `cond` against the manifest and builds the 2B-row pair
/// concat(cond, uncond) for every conditioning input (filling "fill" inputs).
/// Exposed for tools and tests; Runner::run calls it.  Throws rstr::InputError.
Conditioning make_guided_conditioning(const Manifest& manifest, const Tensor& noise, const Conditioning& cond,
                                      const Conditioning& uncond);

}  // namespace rstr
