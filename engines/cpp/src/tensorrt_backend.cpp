// TensorRT backend -- UNTESTED: written against the documented TensorRT 10 C++ API
// (NvInferRuntime.h: IRuntime, ICudaEngine, IExecutionContext::setInputShape /
// setTensorAddress / enqueueV3) and the CUDA runtime API.  It has been compiled against the
// TensorRT 10 headers but never linked or run: the build machines have no TensorRT libraries
// and no GPU.  See engines/cpp/README.md.
//
// Design (docs/bundle.md, "Walking the plan", on the device):
//   * one engine per graph from the manifest's `engines`, deserialized once;
//   * persistent device buffers for x [B], x2 [2B], the step graphs' outputs, the denoiser
//     output [2B], and the conditioning pair concat(cond, uncond) [2B] per input (its first B
//     rows are the conditional batch, so unguided steps bind the same address);
//   * two denoiser execution contexts with fixed input shapes, one at 2B rows (guided steps)
//     and one at B rows (unguided steps), so that neither context's shape state changes
//     after its CUDA graph is captured;
//   * one CUDA stream, and one CUDA graph per step kind:
//       guided:   denoiser(2B) -> step_guided -> copy next -> x, next_pair -> x2
//       unguided: denoiser(B)  -> step_single -> copy next -> x, next_pair -> x2
//     (multistep plans: also next_history -> history, the past samples and model outputs,
//     zeroed at the start of each run)
//     Copying the step outputs back into x / x2 keeps every address fixed (a captured graph
//     bakes its addresses, so ping-pong buffers would need one graph per parity).
//
// Per-step values (timestep, scale, coef_sample[k+1], coef_eps[k+1]) differ at every step while a
// captured graph bakes the addresses it reads.  They are packed per step into one device
// array uploaded once at load; before launching a step's graph, ONE device-to-device
// cudaMemcpyAsync (on the same stream, outside the graph) copies that step's record into a
// fixed "current step" record that both graphs read.  A copy inside the captured region
// would bake its source address too and so force one graph per step; updating graph nodes
// per step (cudaGraphExecMemcpyNodeSetParams) would work but adds host-side API calls per
// step.  The chosen copy is 1 KiB-ish, asynchronous and needs no host synchronisation, so the
// loop stays device-resident: the host only uploads the noise and conditioning, enqueues
// (copy + graph launch) per step, and downloads the final latents.
//
// If a graph cannot be captured (some engines are not capturable), that step kind falls back
// to enqueueing the same work eagerly each step.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <type_traits>

#include "executor.hpp"

namespace rstr {
namespace {

// ---------------------------------------------------------------------------------------
// CUDA resources (RAII)
// ---------------------------------------------------------------------------------------

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw BackendError(std::string("tensorrt: ") + what + " failed: " + cudaGetErrorString(status));
}

struct CudaFree {
  void operator()(void* p) const noexcept { cudaFree(p); }
};
using DeviceBuffer = std::unique_ptr<void, CudaFree>;

DeviceBuffer device_alloc(size_t bytes) {
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc");  // 256-byte aligned
  DeviceBuffer buf(p);
  check_cuda(cudaMemset(p, 0, bytes), "cudaMemset");
  return buf;
}

struct StreamDeleter {
  void operator()(cudaStream_t s) const noexcept { cudaStreamDestroy(s); }
};
using Stream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;

struct GraphDeleter {
  void operator()(cudaGraph_t g) const noexcept { cudaGraphDestroy(g); }
};
using Graph = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDeleter>;

struct GraphExecDeleter {
  void operator()(cudaGraphExec_t g) const noexcept { cudaGraphExecDestroy(g); }
};
using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;

/// TensorRT binding addresses must be 256-byte aligned.
constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

char* bytes(const DeviceBuffer& b) { return static_cast<char*>(b.get()); }

// ---------------------------------------------------------------------------------------
// TensorRT objects
// ---------------------------------------------------------------------------------------

/// Keeps the last error TensorRT reported, to put it into the exception that follows.
class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kERROR) last_error_ = msg;
  }
  std::string last_error() const { return last_error_.empty() ? "no message" : last_error_; }

 private:
  std::string last_error_;
};

nvinfer1::DataType trt_type(DType d) { return d == DType::Float32 ? nvinfer1::DataType::kFLOAT : nvinfer1::DataType::kINT64; }
size_t dtype_size(DType d) { return d == DType::Float32 ? sizeof(float) : sizeof(int64_t); }

nvinfer1::Dims to_dims(const std::vector<int64_t>& shape) {
  nvinfer1::Dims d{};
  if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    throw BundleError("tensorrt: shape " + shape_string(shape) + " has more dimensions than TensorRT supports");
  d.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
  return d;
}

std::vector<int64_t> from_dims(const nvinfer1::Dims& d) {
  return std::vector<int64_t>(d.d, d.d + std::max(d.nbDims, 0));
}

/// One deserialized engine, its name in the plan and its manifest description.
struct Engine {
  std::string role;
  const GraphInfo* info = nullptr;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
};

class TensorRTExecutor final : public Runner::Executor {
 public:
  TensorRTExecutor(const Bundle& bundle, const RunnerOptions& options)
      : manifest_(bundle.manifest()), device_(options.device_id), host_code_(options.engine_host_code) {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw BackendError("tensorrt: createInferRuntime failed: " + logger_.last_error());
    // Host code embedded in engines (version-compatible ones) runs only when the caller trusts the author.
    runtime_->setEngineHostCodeAllowed(host_code_ == EngineHostCode::Allow);

    const bool any_guided = manifest_.plan.num_guided() > 0;
    const bool any_single = manifest_.plan.num_guided() < static_cast<int>(manifest_.plan.steps.size());
    denoiser_ = load(bundle, "denoiser", manifest_.denoiser);
    if (any_guided) step_guided_ = load(bundle, "step_guided", manifest_.step_guided);
    if (any_single) step_single_ = load(bundle, "step_single", manifest_.step_single);

    cudaStream_t s = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    stream_.reset(s);

    allocate();
    if (any_guided) {
      den_guided_ = make_context(denoiser_, 2 * manifest_.batch);
      ctx_guided_ = make_context(step_guided_, manifest_.batch);
      graph_guided_ = capture(StepKind::Guided);
    }
    if (any_single) {
      den_single_ = make_context(denoiser_, manifest_.batch);
      ctx_single_ = make_context(step_single_, manifest_.batch);
      graph_single_ = capture(StepKind::Single);
    }
  }

  Tensor run(const Tensor& x, const Conditioning& cond2) override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    cudaStream_t s = stream_.get();
    const size_t xb = x.f32().size() * sizeof(float);
    // x2 = [x; x]
    check_cuda(cudaMemcpyAsync(x_.get(), x.f32().data(), xb, cudaMemcpyHostToDevice, s), "upload noise");
    check_cuda(cudaMemcpyAsync(bytes(x2_), x_.get(), xb, cudaMemcpyDeviceToDevice, s), "copy x");
    check_cuda(cudaMemcpyAsync(bytes(x2_) + xb, x_.get(), xb, cudaMemcpyDeviceToDevice, s), "copy x");
    for (const auto& c : manifest_.conditioning) {
      const Tensor& t = cond2.at(c.info.name);
      const void* src = t.dtype() == DType::Float32 ? static_cast<const void*>(t.f32().data())
                                                    : static_cast<const void*>(t.i64().data());
      check_cuda(cudaMemcpyAsync(cond2_.at(c.info.name).get(), src, static_cast<size_t>(t.numel()) * dtype_size(t.dtype()),
                                 cudaMemcpyHostToDevice, s),
                 "upload conditioning");
    }
    if (history_) check_cuda(cudaMemsetAsync(history_.get(), 0, history_bytes(), s), "zero history");
    for (size_t i = 0; i < manifest_.plan.steps.size(); ++i) {
      // The step's record -> the fixed record every graph reads (see the note at the top).
      check_cuda(cudaMemcpyAsync(current_.get(), bytes(records_) + i * record_bytes_, record_bytes_,
                                 cudaMemcpyDeviceToDevice, s),
                 "copy step parameters");
      launch(manifest_.plan.steps[i].kind, i);
    }
    std::vector<float> out(x.f32().size());
    check_cuda(cudaMemcpyAsync(out.data(), x_.get(), xb, cudaMemcpyDeviceToHost, s), "download latents");
    check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    return Tensor::float32(manifest_.sample.shape, std::move(out));
  }

 private:
  Engine load(const Bundle& bundle, const std::string& role, const GraphInfo& info) {
    const EngineEntry* entry = manifest_.find_engine(role);
    if (!entry)
      throw BundleError("tensorrt: the bundle has no TensorRT engine for graph '" + role +
                        "' (export it for TensorRT, or use the onnxruntime backends)");
    check_compute_capability(*entry);
    if (entry->version_compatible && host_code_ != EngineHostCode::Allow)
      throw BackendError("tensorrt: engine " + entry->file +
                         " is version-compatible: it embeds TensorRT's lean runtime as host code that runs when it loads; "
                         "pass --trust-engine-host-code (EngineHostCode::Allow) only if you trust the bundle's author, or "
                         "rebuild the engines for this TensorRT");
    std::ifstream in(bundle.path(entry->file), std::ios::binary);
    const std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (blob.empty()) throw BundleError("tensorrt: cannot read engine " + entry->file);
    Engine e{role, &info, std::unique_ptr<nvinfer1::ICudaEngine>(runtime_->deserializeCudaEngine(blob.data(), blob.size()))};
    if (!e.engine)
      throw BackendError("tensorrt: cannot deserialize " + entry->file + " (built with TensorRT " + entry->tensorrt_version +
                         ", this is " + std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
                         "; rebuild the engines with this version): " + logger_.last_error());
    for (const auto* list : {&info.inputs, &info.outputs}) {
      for (const TensorInfo& t : *list) {
        const auto mode = e.engine->getTensorIOMode(t.name.c_str());
        const auto want = list == &info.inputs ? nvinfer1::TensorIOMode::kINPUT : nvinfer1::TensorIOMode::kOUTPUT;
        if (mode != want) throw BundleError("tensorrt: engine " + entry->file + " has no " +
                                            (want == nvinfer1::TensorIOMode::kINPUT ? "input" : "output") + " '" + t.name + "'");
        if (e.engine->getTensorDataType(t.name.c_str()) != trt_type(t.dtype))
          throw BundleError("tensorrt: engine " + entry->file + " tensor '" + t.name + "' is not " + dtype_name(t.dtype));
      }
    }
    return e;
  }

  void check_compute_capability(const EngineEntry& entry) const {
    if (entry.compute_capability.empty()) return;
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_), "cudaDeviceGetAttribute");
    const std::string here = std::to_string(major) + "." + std::to_string(minor);
    if (entry.compute_capability != here)
      throw BackendError("tensorrt: engine " + entry.file + " was built for compute capability " + entry.compute_capability +
                         ", this GPU is " + here + " (rebuild the engines on this GPU)");
  }

  /// Device buffers and the per-step records, allocated once.
  void allocate() {
    const int64_t B = manifest_.batch;
    const size_t S = static_cast<size_t>(numel(manifest_.sample.shape));  // B rows
    const size_t O = static_cast<size_t>(numel(with_rows(manifest_.denoiser.find_output("model_output")->shape, 1)));
    x_ = device_alloc(S * sizeof(float));
    x2_ = device_alloc(2 * S * sizeof(float));
    next_ = device_alloc(S * sizeof(float));
    next2_ = device_alloc(2 * S * sizeof(float));
    out_ = device_alloc(2 * static_cast<size_t>(B) * O * sizeof(float));
    for (const auto& c : manifest_.conditioning)
      cond2_.emplace(c.info.name, device_alloc(2 * static_cast<size_t>(numel(c.info.shape)) * dtype_size(c.info.dtype)));
    if (manifest_.plan.history > 0) {
      history_ = device_alloc(history_bytes());
      next_history_ = device_alloc(history_bytes());
    }

    // Record layout, each field 256-byte aligned for TensorRT:
    //   [timestep x 2B floats][scale][coef_sample x (k+1)][coef_eps x (k+1)]
    const int history = manifest_.plan.history;
    const size_t coefs = align_up(static_cast<size_t>(history + 1) * sizeof(float));
    ts_offset_ = 0;
    scale_offset_ = align_up(2 * static_cast<size_t>(B) * sizeof(float));
    coef_sample_offset_ = scale_offset_ + kAlign;
    coef_eps_offset_ = coef_sample_offset_ + coefs;
    record_bytes_ = coef_eps_offset_ + coefs;
    const size_t n = manifest_.plan.steps.size();
    std::vector<char> host(n * record_bytes_, 0);
    for (size_t i = 0; i < n; ++i) {
      const Step& step = manifest_.plan.steps[i];
      char* r = host.data() + i * record_bytes_;
      auto put = [r](size_t offset, float v) { std::memcpy(r + offset, &v, sizeof v); };
      for (int64_t k = 0; k < 2 * B; ++k) put(ts_offset_ + static_cast<size_t>(k) * sizeof(float), step.model_timestep);
      put(scale_offset_, step.scale);
      const std::vector<float> cs = step.sample_coefficients(history), ce = step.eps_coefficients(history);
      for (int d = 0; d <= history; ++d) {
        put(coef_sample_offset_ + static_cast<size_t>(d) * sizeof(float), cs[static_cast<size_t>(d)]);
        put(coef_eps_offset_ + static_cast<size_t>(d) * sizeof(float), ce[static_cast<size_t>(d)]);
      }
    }
    records_ = device_alloc(host.size());
    check_cuda(cudaMemcpy(records_.get(), host.data(), host.size(), cudaMemcpyHostToDevice), "upload plan");
    current_ = device_alloc(record_bytes_);
  }

  /// [B, k, 2, ...]: the past (sample, model output) pairs of a multistep plan.
  std::vector<int64_t> history_shape() const {
    std::vector<int64_t> shape = {manifest_.batch, manifest_.plan.history, 2};
    shape.insert(shape.end(), manifest_.sample.shape.begin() + 1, manifest_.sample.shape.end());
    return shape;
  }
  size_t history_bytes() const { return static_cast<size_t>(numel(history_shape())) * sizeof(float); }

  /// An execution context of `e` with every input shape fixed at `rows` batch rows and every
  /// tensor bound to its persistent device buffer, looked up by name.
  std::unique_ptr<nvinfer1::IExecutionContext> make_context(const Engine& e, int64_t rows) {
    std::unique_ptr<nvinfer1::IExecutionContext> ctx(e.engine->createExecutionContext());
    if (!ctx) throw BackendError("tensorrt: cannot create an execution context for " + e.role + ": " + logger_.last_error());
    select_profile(e, *ctx, rows);
    const int64_t B = manifest_.batch;
    char* cur = bytes(current_);
    auto bind = [&](const std::string& name, void* address, const std::vector<int64_t>& shape) {
      if (e.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT &&
          !ctx->setInputShape(name.c_str(), to_dims(shape)))
        throw BackendError("tensorrt: " + e.role + " rejects input '" + name + "' of shape " + shape_string(shape) +
                           " (outside the engine's optimization profile?): " + logger_.last_error());
      if (!ctx->setTensorAddress(name.c_str(), address))
        throw BackendError("tensorrt: " + e.role + " cannot bind '" + name + "': " + logger_.last_error());
    };
    const std::vector<int64_t>& sample = manifest_.sample.shape;  // [B, ...]
    const std::vector<int64_t> out_shape = with_rows(manifest_.denoiser.find_output("model_output")->shape, rows);
    if (e.role == "denoiser") {
      bind("sample", rows == B ? x_.get() : x2_.get(), with_rows(sample, rows));
      bind("timestep", cur + ts_offset_, {rows});
      for (const auto& c : manifest_.conditioning)
        bind(c.info.name, cond2_.at(c.info.name).get(), with_rows(c.info.shape, rows));
      bind("model_output", out_.get(), out_shape);
    } else {
      const int64_t out_rows = e.role == "step_guided" ? 2 * B : B;
      bind("sample", x_.get(), sample);
      bind("model_output", out_.get(), with_rows(out_shape, out_rows));
      if (e.role == "step_guided") bind("scale", cur + scale_offset_, {1});
      const int64_t k = manifest_.plan.history;
      bind("coef_sample", cur + coef_sample_offset_, {k + 1});
      bind("coef_eps", cur + coef_eps_offset_, {k + 1});
      bind("next_sample", next_.get(), sample);
      bind("next_sample_pair", next2_.get(), with_rows(sample, 2 * B));
      if (k > 0) {
        bind("history", history_.get(), history_shape());
        bind("next_history", next_history_.get(), history_shape());
      }
    }
    if (!ctx->allInputDimensionsSpecified())
      throw BackendError("tensorrt: " + e.role + " has inputs that manifest.json does not describe");
    // Resolved output shapes must match the buffers allocated from the manifest.
    for (const TensorInfo& t : e.info->outputs) {
      const std::vector<int64_t> got = from_dims(ctx->getTensorShape(t.name.c_str()));
      const std::vector<int64_t> want = t.name == "model_output"       ? out_shape
                                        : t.name == "next_sample_pair" ? with_rows(sample, 2 * B)
                                        : t.name == "next_history"     ? history_shape()
                                                                       : sample;
      if (got != want)
        throw BundleError("tensorrt: " + e.role + " output '" + t.name + "' has shape " + shape_string(got) + ", expected " +
                          shape_string(want));
    }
    return ctx;
  }

  /// A profile whose [min, max] batch covers `rows`.  The two denoiser contexts take distinct
  /// profiles when the engine has them; with one profile they share it, which TensorRT allows
  /// for contexts that never run concurrently (ours run in order on one stream).
  void select_profile(const Engine& e, nvinfer1::IExecutionContext& ctx, int64_t rows) {
    const int32_t n = e.engine->getNbOptimizationProfiles();
    if (n <= 1) return;  // profile 0 is selected at creation
    for (int32_t p = 0; p < n; ++p) {
      if (e.role == "denoiser" && p == profile_in_use_) continue;
      const auto lo = e.engine->getProfileShape("sample", p, nvinfer1::OptProfileSelector::kMIN);
      const auto hi = e.engine->getProfileShape("sample", p, nvinfer1::OptProfileSelector::kMAX);
      if (lo.nbDims > 0 && lo.d[0] <= rows && rows <= hi.d[0]) {
        if (!ctx.setOptimizationProfileAsync(p, stream_.get()))
          throw BackendError("tensorrt: cannot select optimization profile " + std::to_string(p) + " of " + e.role);
        check_cuda(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
        if (e.role == "denoiser") profile_in_use_ = p;
        return;
      }
    }
    // Fall back to profile 0; setInputShape reports a batch outside it.
  }

  /// Enqueues one step of `kind` (denoiser, step graph, copy-back) on the stream.
  void enqueue(StepKind kind, size_t step) {
    cudaStream_t s = stream_.get();
    auto& den = kind == StepKind::Guided ? den_guided_ : den_single_;
    auto& ctx = kind == StepKind::Guided ? ctx_guided_ : ctx_single_;
    if (!den->enqueueV3(s)) throw BackendError("tensorrt: denoiser failed at step " + std::to_string(step) + ": " + logger_.last_error());
    if (!ctx->enqueueV3(s))
      throw BackendError(std::string("tensorrt: ") + (kind == StepKind::Guided ? "step_guided" : "step_single") +
                         " failed at step " + std::to_string(step) + ": " + logger_.last_error());
    const size_t xb = static_cast<size_t>(numel(manifest_.sample.shape)) * sizeof(float);
    check_cuda(cudaMemcpyAsync(x_.get(), next_.get(), xb, cudaMemcpyDeviceToDevice, s), "copy next_sample");
    check_cuda(cudaMemcpyAsync(x2_.get(), next2_.get(), 2 * xb, cudaMemcpyDeviceToDevice, s), "copy next_sample_pair");
    if (history_)
      check_cuda(cudaMemcpyAsync(history_.get(), next_history_.get(), history_bytes(), cudaMemcpyDeviceToDevice, s),
                 "copy next_history");
  }

  /// One CUDA graph of a step of `kind`; empty when the work cannot be captured.
  GraphExec capture(StepKind kind) {
    cudaStream_t s = stream_.get();
    // TensorRT asks for one enqueue before capture so that deferred set-up is done; it runs
    // on the zeroed buffers, and run() overwrites x, x2 and the conditioning anyway.
    enqueue(kind, 0);
    check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    check_cuda(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    bool enqueued = true;
    try {
      enqueue(kind, 0);
    } catch (const BackendError&) {
      enqueued = false;
    }
    cudaGraph_t raw = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(s, &raw);
    Graph graph(raw);
    if (!enqueued || ended != cudaSuccess || !graph) {
      (void)cudaGetLastError();  // clear the capture error; this kind runs eagerly
      return nullptr;
    }
    cudaGraphExec_t exec = nullptr;
    if (cudaGraphInstantiateWithFlags(&exec, graph.get(), 0) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return GraphExec(exec);
  }

  void launch(StepKind kind, size_t step) {
    const GraphExec& graph = kind == StepKind::Guided ? graph_guided_ : graph_single_;
    if (graph)
      check_cuda(cudaGraphLaunch(graph.get(), stream_.get()), "cudaGraphLaunch");
    else
      enqueue(kind, step);
  }

  Manifest manifest_;
  int device_;
  EngineHostCode host_code_;
  // Declaration order matters: members are destroyed in reverse, so graphs and contexts go
  // before the engines, the engines before the runtime, and the runtime before the logger.
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  Engine denoiser_, step_guided_, step_single_;
  Stream stream_;
  DeviceBuffer x_, x2_, next_, next2_, out_, records_, current_, history_, next_history_;
  std::map<std::string, DeviceBuffer> cond2_;
  size_t ts_offset_ = 0, scale_offset_ = 0, coef_sample_offset_ = 0, coef_eps_offset_ = 0, record_bytes_ = 0;
  int32_t profile_in_use_ = -1;
  std::unique_ptr<nvinfer1::IExecutionContext> den_guided_, den_single_, ctx_guided_, ctx_single_;
  GraphExec graph_guided_, graph_single_;
};

}  // namespace

std::unique_ptr<Runner::Executor> make_tensorrt_executor(const Bundle& bundle, const RunnerOptions& options) {
  return std::make_unique<TensorRTExecutor>(bundle, options);
}

}  // namespace rstr
