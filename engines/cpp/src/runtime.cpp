// Tensors, input checks and the Runner that hands the plan walk to a backend.
#include <algorithm>
#include <cmath>

#include "executor.hpp"
#include "rstr/runtime.hpp"

namespace rstr {

std::string one_line(const std::string& text) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      out += std::string("\\x") + hex[c >> 4] + hex[c & 15];
    } else if (c == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) == 0x85) {
      out += "\\u0085";
      ++i;
    } else if (c == 0xe2 && i + 2 < text.size() && static_cast<unsigned char>(text[i + 1]) == 0x80 &&
               (static_cast<unsigned char>(text[i + 2]) == 0xa8 || static_cast<unsigned char>(text[i + 2]) == 0xa9)) {
      out += static_cast<unsigned char>(text[i + 2]) == 0xa8 ? "\\u2028" : "\\u2029";
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Tensor
// ---------------------------------------------------------------------------------------

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> with_rows(std::vector<int64_t> shape, int64_t rows) {
  shape.at(0) = rows;
  return shape;
}

const char* dtype_name(DType dtype) { return dtype == DType::Float32 ? "float32" : "int64"; }

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace {
void check_count(const std::vector<int64_t>& shape, size_t count) {
  for (int64_t d : shape)
    if (d < 0) throw InputError("tensor shape " + shape_string(shape) + " has a negative dimension");
  if (static_cast<size_t>(numel(shape)) != count)
    throw InputError("tensor shape " + shape_string(shape) + " holds " + std::to_string(numel(shape)) + " values, got " +
                     std::to_string(count));
}
}  // namespace

Tensor Tensor::float32(std::vector<int64_t> shape, std::vector<float> values) {
  check_count(shape, values.size());
  Tensor t;
  t.dtype_ = DType::Float32;
  t.shape_ = std::move(shape);
  t.f32_ = std::move(values);
  return t;
}

Tensor Tensor::int64(std::vector<int64_t> shape, std::vector<int64_t> values) {
  check_count(shape, values.size());
  Tensor t;
  t.dtype_ = DType::Int64;
  t.shape_ = std::move(shape);
  t.i64_ = std::move(values);
  return t;
}

Tensor Tensor::filled(DType dtype, std::vector<int64_t> shape, double value) {
  const auto n = static_cast<size_t>(rstr::numel(shape));
  if (dtype == DType::Float32) return float32(std::move(shape), std::vector<float>(n, static_cast<float>(value)));
  return int64(std::move(shape), std::vector<int64_t>(n, static_cast<int64_t>(value)));
}

int64_t Tensor::numel() const { return rstr::numel(shape_); }

const std::vector<float>& Tensor::f32() const {
  if (dtype_ != DType::Float32) throw InputError("tensor holds int64 values, float32 was asked for");
  return f32_;
}
std::vector<float>& Tensor::f32() {
  if (dtype_ != DType::Float32) throw InputError("tensor holds int64 values, float32 was asked for");
  return f32_;
}
const std::vector<int64_t>& Tensor::i64() const {
  if (dtype_ != DType::Int64) throw InputError("tensor holds float32 values, int64 was asked for");
  return i64_;
}
std::vector<int64_t>& Tensor::i64() {
  if (dtype_ != DType::Int64) throw InputError("tensor holds float32 values, int64 was asked for");
  return i64_;
}

// ---------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------

namespace {

void check_tensor(const std::string& what, const Tensor& t, const TensorInfo& want) {
  if (t.dtype() != want.dtype)
    throw InputError(what + " is " + dtype_name(t.dtype()) + " but the bundle expects " + dtype_name(want.dtype));
  if (t.shape() != want.shape)
    throw InputError(what + " has shape " + shape_string(t.shape()) + " but the bundle expects " +
                     shape_string(want.shape));
}

void check_finite(const std::string& what, const Tensor& t) {
  if (t.dtype() != DType::Float32) return;
  for (float v : t.f32())
    if (!std::isfinite(v)) throw InputError(what + " contains NaN or infinite values");
}

/// Class labels lie in [0, num_classes); unconditional rows may also hold the input's null (fill) class.
void check_classes(const std::string& what, const Tensor& t, const Manifest& m, const ConditioningInput* null = nullptr) {
  if (!m.num_classes || t.dtype() != DType::Int64) return;
  const bool has_null = null && null->unconditional == UnconditionalKind::Fill;
  for (int64_t v : t.i64())
    if ((v < 0 || v >= *m.num_classes) && !(has_null && static_cast<double>(v) == null->fill))
      throw InputError(what + " holds class label " + std::to_string(v) + ", out of range: this bundle has classes 0.." +
                       std::to_string(*m.num_classes - 1) +
                       (has_null ? " and the null class " + std::to_string(static_cast<int64_t>(null->fill)) : ""));
}

std::string input_names(const Manifest& m) {
  std::string s;
  for (const auto& c : m.conditioning) s += (s.empty() ? "" : ", ") + c.info.name;
  return s.empty() ? "none" : s;
}

void check_known(const Conditioning& given, const Manifest& m, const char* what) {
  for (const auto& [name, _] : given) {
    const bool known = std::any_of(m.conditioning.begin(), m.conditioning.end(),
                                   [&](const ConditioningInput& c) { return c.info.name == name; });
    if (!known) throw InputError(std::string(what) + " '" + name + "' is not an input of this bundle (inputs: " + input_names(m) + ")");
  }
}

Tensor concat_rows(const Tensor& a, const Tensor& b) {
  std::vector<int64_t> shape = a.shape();
  shape[0] += b.shape()[0];
  if (a.dtype() == DType::Float32) {
    std::vector<float> v(a.f32());
    v.insert(v.end(), b.f32().begin(), b.f32().end());
    return Tensor::float32(std::move(shape), std::move(v));
  }
  std::vector<int64_t> v(a.i64());
  v.insert(v.end(), b.i64().begin(), b.i64().end());
  return Tensor::int64(std::move(shape), std::move(v));
}

}  // namespace

Conditioning make_guided_conditioning(const Manifest& m, const Tensor& noise, const Conditioning& cond,
                                      const Conditioning& uncond) {
  check_tensor("noise", noise, m.sample);
  check_finite("noise", noise);
  check_known(cond, m, "conditioning");
  check_known(uncond, m, "unconditional input");
  Conditioning cond2;
  for (const auto& input : m.conditioning) {
    const std::string& name = input.info.name;
    auto c = cond.find(name);
    if (c == cond.end()) throw InputError("conditioning input '" + name + "' is missing (inputs: " + input_names(m) + ")");
    check_tensor("conditioning '" + name + "'", c->second, input.info);
    check_finite("conditioning '" + name + "'", c->second);
    check_classes("conditioning '" + name + "'", c->second, m);

    Tensor u;
    auto given = uncond.find(name);
    if (given != uncond.end()) {
      check_tensor("unconditional input '" + name + "'", given->second, input.info);
      check_finite("unconditional input '" + name + "'", given->second);
      check_classes("unconditional input '" + name + "'", given->second, m, &input);
      u = given->second;
    } else if (input.unconditional == UnconditionalKind::Fill) {
      u = Tensor::filled(input.info.dtype, input.info.shape, input.fill);
    } else if (m.plan.num_guided() == 0) {
      u = c->second;  // no guided step reads the unconditional rows: any placeholder will do
    } else {
      throw InputError("unconditional input '" + name + "' is required by this bundle (e.g. negative-prompt embeddings)");
    }
    cond2.emplace(name, concat_rows(c->second, u));
  }
  return cond2;
}

// ---------------------------------------------------------------------------------------
// Backends and Runner
// ---------------------------------------------------------------------------------------

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::OnnxRuntimeCpu: return "onnxruntime-cpu";
    case Backend::OnnxRuntimeCuda: return "onnxruntime-cuda";
    case Backend::TensorRT: return "tensorrt";
  }
  return "unknown";
}

bool backend_compiled(Backend backend) {
  switch (backend) {
    case Backend::OnnxRuntimeCpu: return true;
    case Backend::OnnxRuntimeCuda:
#ifdef RSTR_HAVE_CUDA
      return true;
#else
      return false;
#endif
    case Backend::TensorRT:
#ifdef RSTR_HAVE_TENSORRT
      return true;
#else
      return false;
#endif
  }
  return false;
}

Runner::Runner(const Bundle& bundle, Backend backend, RunnerOptions options)
    : backend_(backend), manifest_(bundle.manifest()) {
  switch (backend) {
    case Backend::OnnxRuntimeCpu:
    case Backend::OnnxRuntimeCuda:
      executor_ = make_onnxruntime_executor(bundle, backend, options);
      break;
    case Backend::TensorRT:
#ifdef RSTR_HAVE_TENSORRT
      executor_ = make_tensorrt_executor(bundle, options);
#else
      throw BackendError(
          "this build has no TensorRT backend (CMake did not find TensorRT; configure with "
          "-DTENSORRT_ROOT=/path/to/TensorRT, see engines/cpp/README.md)");
#endif
      break;
  }
  if (manifest_.decoder.kind == DecoderKind::Vae) {
    // The decoder runs once per call on whole arrays: ONNX Runtime, on CUDA where the plan runs on a GPU.
    const bool gpu = backend != Backend::OnnxRuntimeCpu && backend_compiled(Backend::OnnxRuntimeCuda);
    decoder_ = make_onnxruntime_graph(bundle, "vae_decoder", manifest_.decoder.graph,
                                      gpu ? Backend::OnnxRuntimeCuda : Backend::OnnxRuntimeCpu, options);
  }
}

Runner::~Runner() = default;
Runner::Runner(Runner&&) noexcept = default;
Runner& Runner::operator=(Runner&&) noexcept = default;

Tensor Runner::run(const Tensor& noise, const Conditioning& cond, const Conditioning& uncond) {
  const Conditioning cond2 = make_guided_conditioning(manifest_, noise, cond, uncond);
  std::vector<float> x(noise.f32());
  for (float& v : x) v *= manifest_.plan.init_noise_sigma;
  Tensor out = executor_->run(Tensor::float32(noise.shape(), std::move(x)), cond2);
  if (out.dtype() != DType::Float32 || out.shape() != manifest_.sample.shape)
    throw BackendError(std::string(backend_name(backend_)) + " returned latents of shape " + shape_string(out.shape()) +
                       ", expected " + shape_string(manifest_.sample.shape));
  return out;
}

Tensor Runner::decode(const Tensor& latents) {
  const Decoder& d = manifest_.decoder;
  if (latents.dtype() != DType::Float32 || latents.shape() != manifest_.sample.shape)
    throw InputError("latents have shape " + shape_string(latents.shape()) + " but the bundle's are " +
                     shape_string(manifest_.sample.shape) + " (float32)");
  if (d.kind == DecoderKind::Vae)
    return decoder_->run("latents", latents, "images", with_rows(d.graph.find_output("images")->shape, manifest_.batch));
  if (d.kind != DecoderKind::Pixels)
    throw InputError("this bundle has no decoder this runtime implements: it returns latents only (decode them yourself)");
  const auto& s = latents.shape();
  const bool packed = s.size() == 3;  // 2x2-packed [B, H*W/4, 4C] (FLUX, Qwen-Image): token (h, w) holds C x 2 x 2 pixels
  if (s.size() != 4 && !packed)
    throw InputError("a pixels decoder needs latents [B, C, H, W] or [B, H*W/4, 4C], got " + shape_string(s));
  const int64_t B = s[0], C = packed ? d.channels : s[1], H = packed ? d.size : s[2], W = packed ? d.size : s[3];
  // index of pixel (b, c, h, w) in the latents: NCHW, or token (h/2, w/2) holding C x 2 x 2 features
  const auto at = [&](int64_t b, int64_t c, int64_t h, int64_t w) {
    return static_cast<size_t>(packed ? (b * (H * W / 4) + (h / 2) * (W / 2) + w / 2) * 4 * C + (c * 2 + h % 2) * 2 + w % 2
                                      : ((b * C + c) * H + h) * W + w);
  };
  std::vector<float> out(static_cast<size_t>(B * H * W * C));
  const std::vector<float>& v = latents.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const float t = (v[at(b, c, h, w)] - d.lo) / (d.hi - d.lo);
          out[static_cast<size_t>(((b * H + h) * W + w) * C + c)] = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
        }
  return Tensor::float32({B, H, W, C}, std::move(out));
}

}  // namespace rstr
