// Internal: the interface each backend implements, and the factories the Runner calls.
#pragma once

#include <memory>

#include "rstr/runtime.hpp"

namespace rstr {

/// Walks a bundle's plan on one backend.  The Runner has already checked the inputs.
class Runner::Executor {
 public:
  virtual ~Executor() = default;
  /// x: float32 [B, ...] = noise * plan.init_noise_sigma;
  /// cond2: every conditioning input as [2B, ...] = concat(cond, uncond); its first B rows are
  /// the conditional batch that unguided steps use.
  /// Returns the final latents, float32 [B, ...].
  virtual Tensor run(const Tensor& x, const Conditioning& cond2) = 0;
};

/// One graph run on whole arrays (the VAE decoder): one float32 input, one float32 output.
class Runner::GraphSession {
 public:
  virtual ~GraphSession() = default;
  /// Runs the graph; the output is checked against `out_shape`.
  virtual Tensor run(const std::string& input, const Tensor& x, const std::string& output,
                     const std::vector<int64_t>& out_shape) = 0;
};

/// `info` (the graph `role` of the bundle) on ONNX Runtime, CPU or CUDA as `backend` says.
std::unique_ptr<Runner::GraphSession> make_onnxruntime_graph(const Bundle& bundle, const std::string& role,
                                                             const GraphInfo& info, Backend backend,
                                                             const RunnerOptions& options);

/// ONNX Runtime on the CPU, or with the CUDA execution provider (Backend::OnnxRuntimeCuda).
std::unique_ptr<Runner::Executor> make_onnxruntime_executor(const Bundle& bundle, Backend backend,
                                                             const RunnerOptions& options);

/// TensorRT engines from the manifest's `engines`.  Only linked in builds that found
/// TensorRT; elsewhere Runner reports the backend as not compiled.
std::unique_ptr<Runner::Executor> make_tensorrt_executor(const Bundle& bundle, const RunnerOptions& options);

/// Number of elements of a concrete shape.
int64_t numel(const std::vector<int64_t>& shape);

/// `shape` with dimension 0 replaced by `rows`.
std::vector<int64_t> with_rows(std::vector<int64_t> shape, int64_t rows);

}  // namespace rstr
