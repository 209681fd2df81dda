// ONNX Runtime backend: the plan walk of docs/bundle.md, one Ort::Session per graph, every
// tensor bound by name.  Each step graph's outputs (x, x2) feed the next step as they are,
// without copies.  Tensors live in host memory: with Backend::OnnxRuntimeCuda the sessions
// run on the CUDA execution provider and ONNX Runtime copies inputs and outputs between host
// and device on every call; the device-resident loop is the TensorRT backend's job.
//
// The API table is fetched by hand (init_api below) so that a library older than the headers
// is reported as an error instead of crashing on a null table.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <set>
#include <utility>

#include "executor.hpp"

namespace rstr {
namespace {

/// Headers and library may differ in version: the C API is versioned, and a newer library
/// serves an older API version (Debian's 1.21 headers run on the wheel's 1.32 library).
void init_api() {
  const OrtApiBase* base = OrtGetApiBase();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api)
    throw BackendError(std::string("the ONNX Runtime library (") + base->GetVersionString() +
                       ") is older than the headers rstr_runtime was built with (C API version " +
                       std::to_string(ORT_API_VERSION) + "); use a newer library");
  Ort::InitApi(api);
}

const char* onnx_type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "another type";
  }
}

ONNXTensorElementDataType onnx_type(DType d) {
  return d == DType::Float32 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

/// One named input of a call: a tensor that views memory owned elsewhere.
struct Input {
  std::string name;
  Ort::Value value;
};

/// One output of a call and the shape the plan expects of it.
struct Output {
  std::string name;
  std::vector<int64_t> shape;
};

/// ONNX Runtime's messages can span lines; an rstr::Error is one line.
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

/// One graph of the bundle as an Ort::Session, checked against the manifest on load.
class Graph {
 public:
  Graph(Ort::Env& env, const Ort::SessionOptions& options, const Bundle& bundle, const std::string& role,
        const GraphInfo& info, Backend backend)
      : role_(role), backend_(backend_name(backend)), session_(load(env, options, bundle, info)) {
    check_io(info);
  }

  /// Runs the graph with inputs bound by name; returns the outputs (allocated by ONNX
  /// Runtime) in the order asked for, each checked against its expected shape.
  std::vector<Ort::Value> run(std::vector<Input>& inputs, const std::vector<Output>& outputs, size_t step) {
    std::vector<const char*> in_names, out_names;
    std::vector<Ort::Value> in_values;
    for (auto& in : inputs) {
      in_names.push_back(in.name.c_str());
      in_values.push_back(std::move(in.value));
    }
    for (const auto& out : outputs) out_names.push_back(out.name.c_str());
    std::vector<Ort::Value> results;
    try {
      results = session_.Run(Ort::RunOptions{nullptr}, in_names.data(), in_values.data(), in_values.size(),
                             out_names.data(), out_names.size());
    } catch (const Ort::Exception& e) {
      throw BackendError(backend_ + ": " + role_ + " failed at step " + std::to_string(step) + ": " + one_line(e.what()));
    }
    for (size_t i = 0; i < outputs.size(); ++i) {
      const std::vector<int64_t> got = results[i].GetTensorTypeAndShapeInfo().GetShape();
      if (got != outputs[i].shape)
        throw BackendError(backend_ + ": " + role_ + " output '" + outputs[i].name + "' has shape " + shape_string(got) +
                           " at step " + std::to_string(step) + ", expected " + shape_string(outputs[i].shape));
    }
    return results;
  }

 private:
  Ort::Session load(Ort::Env& env, const Ort::SessionOptions& options, const Bundle& bundle, const GraphInfo& info) {
    try {
      return Ort::Session(env, bundle.path(info.file).c_str(), options);
    } catch (const Ort::Exception& e) {
      throw BackendError(backend_ + ": cannot load " + role_ + " (" + info.file + "): " + one_line(e.what()));
    }
  }

  /// The session's inputs and outputs must be exactly the manifest's, with the same dtypes.
  void check_io(const GraphInfo& info) {
    Ort::AllocatorWithDefaultOptions alloc;
    std::set<std::string> inputs, outputs;
    for (size_t i = 0; i < session_.GetInputCount(); ++i) {
      const std::string name = session_.GetInputNameAllocated(i, alloc).get();
      const TensorInfo* want = info.find_input(name);
      if (!want) fail("has input '" + name + "' that manifest.json does not list");
      check_type(name, session_.GetInputTypeInfo(i), *want);
      inputs.insert(name);
    }
    for (size_t i = 0; i < session_.GetOutputCount(); ++i) {
      const std::string name = session_.GetOutputNameAllocated(i, alloc).get();
      if (const TensorInfo* want = info.find_output(name)) check_type(name, session_.GetOutputTypeInfo(i), *want);
      outputs.insert(name);
    }
    for (const auto& t : info.inputs)
      if (!inputs.count(t.name)) fail("has no input '" + t.name + "' (listed in manifest.json)");
    for (const auto& t : info.outputs)
      if (!outputs.count(t.name)) fail("has no output '" + t.name + "' (listed in manifest.json)");
  }

  void check_type(const std::string& name, const Ort::TypeInfo& type, const TensorInfo& want) {
    if (type.GetONNXType() != ONNX_TYPE_TENSOR) fail("'" + name + "' is not a tensor");
    const auto got = type.GetTensorTypeAndShapeInfo().GetElementType();
    if (got != onnx_type(want.dtype))
      fail("'" + name + "' is " + onnx_type_name(got) + " but manifest.json says " + dtype_name(want.dtype));
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw BundleError(backend_ + ": graph " + role_ + " " + what);
  }

  std::string role_;
  std::string backend_;
  Ort::Session session_;
};

Ort::SessionOptions session_options(Backend backend, const RunnerOptions& options) {
  Ort::SessionOptions so;
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  if (options.cpu_threads > 0) so.SetIntraOpNumThreads(options.cpu_threads);
  if (backend == Backend::OnnxRuntimeCuda) {
#ifdef RSTR_HAVE_CUDA
    OrtCUDAProviderOptions cuda;
    cuda.device_id = options.device_id;
    try {
      so.AppendExecutionProvider_CUDA(cuda);
    } catch (const Ort::Exception& e) {
      throw BackendError(std::string("onnxruntime-cuda: this ONNX Runtime library cannot use CUDA (") + e.what() +
                         "); link a GPU build of ONNX Runtime, or use the cpu backend");
    }
#else
    throw BackendError(
        "this build has no ONNX Runtime CUDA support: reconfigure with -DRSTR_WITH_CUDA=ON against a GPU build of "
        "ONNX Runtime, or use the cpu backend");
#endif
  }
  return so;
}

class OnnxRuntimeExecutor final : public Runner::Executor {
 public:
  OnnxRuntimeExecutor(const Bundle& bundle, Backend backend, const RunnerOptions& options)
      : manifest_(bundle.manifest()),
        env_(ORT_LOGGING_LEVEL_ERROR, "rstr"),
        options_(session_options(backend, options)),
        denoiser_(env_, options_, bundle, "denoiser", manifest_.denoiser, backend),
        step_guided_(env_, options_, bundle, "step_guided", manifest_.step_guided, backend),
        step_single_(env_, options_, bundle, "step_single", manifest_.step_single, backend),
        cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    const TensorInfo& out = *manifest_.denoiser.find_output("model_output");
    if (out.dtype != DType::Float32) throw BundleError("denoiser output model_output must be float32");
    output_shape_ = out.shape;  // [N, ...]; N is set per step
  }

  Tensor run(const Tensor& x_in, const Conditioning& cond2) override {
    const int64_t B = manifest_.batch;
    const std::vector<int64_t>& sample_shape = manifest_.sample.shape;  // [B, ...]
    const std::vector<int64_t> pair_shape = with_rows(sample_shape, 2 * B);

    // x [B] and x2 = [x; x] [2B]: first views of host buffers, then the step graphs' outputs,
    // which feed the next step directly (ONNX Runtime allocates them).
    std::vector<float> x0(x_in.f32()), x20(x0);
    x20.insert(x20.end(), x0.begin(), x0.end());
    Ort::Value x = view(x0.data(), sample_shape);
    Ort::Value x2 = view(x20.data(), pair_shape);
    std::vector<float> timestep(2 * static_cast<size_t>(B));
    float scale = 0.0f;
    std::vector<float> coef_sample, coef_eps;
    // Multistep plans: the history [B, k, 2, ...] of past (sample, model output) pairs, zero at the
    // start (the first steps' past coefficients are 0); the step graphs return the next one.
    const int k = manifest_.plan.history;
    std::vector<int64_t> history_shape = {B, k, 2};
    history_shape.insert(history_shape.end(), sample_shape.begin() + 1, sample_shape.end());
    std::vector<float> history0(k > 0 ? static_cast<size_t>(numel(history_shape)) : 0, 0.0f);
    Ort::Value history = k > 0 ? view(history0.data(), history_shape) : Ort::Value(nullptr);

    for (size_t i = 0; i < manifest_.plan.steps.size(); ++i) {
      const Step& step = manifest_.plan.steps[i];
      const bool guided = step.kind == StepKind::Guided;
      const int64_t rows = guided ? 2 * B : B;
      std::fill(timestep.begin(), timestep.end(), step.model_timestep);

      // out = denoiser(sample=x2 or x, timestep=fill(rows, t), **cond2 or **cond)
      std::vector<Input> inputs;
      inputs.push_back({"sample", view(guided ? x2 : x)});
      inputs.push_back({"timestep", view(timestep.data(), {rows})});
      for (const auto& c : manifest_.conditioning)  // the first B rows of cond2 are cond
        inputs.push_back({c.info.name, view(cond2.at(c.info.name), with_rows(c.info.shape, rows))});
      std::vector<Ort::Value> out = denoiser_.run(inputs, {{"model_output", with_rows(output_shape_, rows)}}, i);

      // x, x2[, history] = step_guided(x, out, [scale], coef_sample, coef_eps[, history]) or step_single(...)
      scale = step.scale;
      coef_sample = step.sample_coefficients(k);
      coef_eps = step.eps_coefficients(k);
      const std::vector<int64_t> coef_shape = {k + 1};
      inputs.clear();
      inputs.push_back({"sample", view(x)});
      inputs.push_back({"model_output", view(out[0])});
      if (guided) inputs.push_back({"scale", view(&scale, {1})});
      inputs.push_back({"coef_sample", view(coef_sample.data(), coef_shape)});
      inputs.push_back({"coef_eps", view(coef_eps.data(), coef_shape)});
      std::vector<Output> outputs = {{"next_sample", sample_shape}, {"next_sample_pair", pair_shape}};
      if (k > 0) {
        inputs.push_back({"history", view(history)});
        outputs.push_back({"next_history", history_shape});
      }
      std::vector<Ort::Value> next = (guided ? step_guided_ : step_single_).run(inputs, outputs, i);
      x = std::move(next[0]);
      x2 = std::move(next[1]);
      if (k > 0) history = std::move(next[2]);
    }
    const float* data = x.GetTensorData<float>();
    return Tensor::float32(sample_shape, std::vector<float>(data, data + numel(sample_shape)));
  }

 private:
  // Views: tensors over memory owned elsewhere (no copy).  ONNX Runtime only reads inputs,
  // so viewing const memory is safe; its C API takes a non-const pointer for all tensors.
  Ort::Value view(float* data, const std::vector<int64_t>& shape) {
    return Ort::Value::CreateTensor<float>(cpu_, data, static_cast<size_t>(numel(shape)), shape.data(), shape.size());
  }
  Ort::Value view(Ort::Value& value) {
    return view(value.GetTensorMutableData<float>(), value.GetTensorTypeAndShapeInfo().GetShape());
  }
  Ort::Value view(const Tensor& t, const std::vector<int64_t>& shape) {
    const auto n = static_cast<size_t>(numel(shape));  // may be the first rows of t only
    if (t.dtype() == DType::Float32)
      return Ort::Value::CreateTensor<float>(cpu_, const_cast<float*>(t.f32().data()), n, shape.data(), shape.size());
    return Ort::Value::CreateTensor<int64_t>(cpu_, const_cast<int64_t*>(t.i64().data()), n, shape.data(), shape.size());
  }

  Manifest manifest_;
  // Declaration order is destruction order in reverse: sessions go before the Env.
  Ort::Env env_;
  Ort::SessionOptions options_;
  Graph denoiser_;
  Graph step_guided_;
  Graph step_single_;
  Ort::MemoryInfo cpu_;
  std::vector<int64_t> output_shape_;
};

/// One whole-array graph (the VAE decoder) as a session of its own.
class OnnxRuntimeGraph final : public Runner::GraphSession {
 public:
  OnnxRuntimeGraph(const Bundle& bundle, const std::string& role, const GraphInfo& info, Backend backend,
                   const RunnerOptions& options)
      : env_(ORT_LOGGING_LEVEL_ERROR, "rstr"),
        options_(session_options(backend, options)),
        graph_(env_, options_, bundle, role, info, backend),
        cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {}

  Tensor run(const std::string& input, const Tensor& x, const std::string& output,
             const std::vector<int64_t>& out_shape) override {
    std::vector<Input> inputs;
    inputs.push_back({input, Ort::Value::CreateTensor<float>(cpu_, const_cast<float*>(x.f32().data()), x.f32().size(),
                                                             x.shape().data(), x.shape().size())});
    std::vector<Ort::Value> out = graph_.run(inputs, {{output, out_shape}}, 0);
    const float* data = out[0].GetTensorData<float>();
    return Tensor::float32(out_shape, std::vector<float>(data, data + numel(out_shape)));
  }

 private:
  Ort::Env env_;
  Ort::SessionOptions options_;
  Graph graph_;
  Ort::MemoryInfo cpu_;
};

}  // namespace

std::unique_ptr<Runner::GraphSession> make_onnxruntime_graph(const Bundle& bundle, const std::string& role,
                                                             const GraphInfo& info, Backend backend,
                                                             const RunnerOptions& options) {
  init_api();
  try {
    return std::make_unique<OnnxRuntimeGraph>(bundle, role, info, backend, options);
  } catch (const Ort::Exception& e) {
    throw BackendError(std::string(backend_name(backend)) + ": " + e.what());
  }
}

std::unique_ptr<Runner::Executor> make_onnxruntime_executor(const Bundle& bundle, Backend backend,
                                                             const RunnerOptions& options) {
  init_api();
  try {
    return std::make_unique<OnnxRuntimeExecutor>(bundle, backend, options);
  } catch (const Ort::Exception& e) {
    throw BackendError(std::string(backend_name(backend)) + ": " + e.what());
  }
}

}  // namespace rstr
