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
