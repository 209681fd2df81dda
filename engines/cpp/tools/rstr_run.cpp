// rstr-run: run an rstr bundle from the command line.  See usage() below.
#include <png.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>

#include "atomic_file.hpp"
#include "npy.hpp"
#include "rstr/runtime.hpp"

namespace {

constexpr const char* kUsage = R"(usage: rstr-run BUNDLE --out FILE.npy|FILE.png [--png IMAGE.png] [--images IMAGES.npy]
                [--png-scale K] (--class N[,N...] | --cond [NAME=]FILE.npy ...) [--uncond [NAME=]FILE.npy ...]
                (--seed S | --noise NOISE.npy) [--backend cpu|cuda|tensorrt]
                [--threads N] [--device N] [--trust-engine-host-code]

Walks the bundle's step plan from initial noise to final latents and, for bundles with a
decoder, decodes them to images.

  BUNDLE              bundle directory (manifest.json is checked: format, version, sha256 of
                      every file, paths inside the bundle)
  --out FILE          FILE.npy: the final latents (float32, shape = sample.shape);
                      FILE.png: the images (bundles with a decoder), B side by side
  --png FILE          also write the images as a PNG (bundles with a decoder: "pixels", the
                      latents are the image, or "vae", the bundle's vae_decoder graph)
  --images FILE       also write the images as float32 .npy [B, H, W, C] in [0, 1]
  --png-scale K       nearest-neighbour upscaling of the PNG (default: 8 below 64 pixels, else 1)
  --class N[,N...]    class labels for a class-conditional bundle: one label for every row, or
                      B comma-separated labels
  --cond NAME=FILE    a conditioning input [B, ...] as .npy (float32 or int64); NAME may be
                      left out when the bundle has a single conditioning input; repeat per input
  --uncond NAME=FILE  the unconditional rows of an input marked "required" (e.g. negative-prompt
                      embeddings); inputs with a "fill" value (DiT's null class) need none
  --seed S            draw the noise with rstr's seeded generator (Philox4x32-10 and Box-Muller,
                      docs/seeding.md; S from 0 to 2^64 - 1): the same noise as `rstr-export run
                      --seed S`, Pipeline(seed=S) and `rstr sample --seed S`
  --noise FILE        initial noise, float32 .npy of shape sample.shape (before init_noise_sigma)
  --backend B         cpu (ONNX Runtime, default), cuda (ONNX Runtime CUDA provider; needs a
                      build with -DRSTR_WITH_CUDA=ON), tensorrt (needs a build with TensorRT and
                      engines in the bundle)
  --threads N         ONNX Runtime intra-op threads (default: ONNX Runtime's choice)
  --device N          CUDA device for cuda and tensorrt (default 0)
  --trust-engine-host-code
                      let version-compatible TensorRT engines run the host code they embed
                      (TensorRT's lean runtime) when they load; only for bundles whose author
                      you trust as you would trust a program from them (default: refused)

Outputs are written to a temporary file beside the target and renamed when complete.

Errors print one line "rstr-run: error: ..." and exit with status 1.
)";

/// A problem with the command line or the files it names.
class UsageError : public rstr::Error {
 public:
  using rstr::Error::Error;
};

struct Args {
  std::string bundle, out, png, images, noise;
  int png_scale = 0;  // 0: 8 for images under 64 pixels, else 1
  std::optional<uint64_t> seed;
  std::vector<int64_t> classes;
  std::vector<std::string> cond, uncond;
  rstr::Backend backend = rstr::Backend::OnnxRuntimeCpu;
  rstr::RunnerOptions options;
};

int64_t parse_int(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const long long v = std::stoll(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    throw UsageError(flag + " expects an integer, got '" + text + "'");
  }
}

uint64_t parse_seed(const std::string& text) {
  try {
    size_t used = 0;
    if (text.empty() || text[0] == '-' || text[0] == '+') throw std::invalid_argument(text);
    const unsigned long long v = std::stoull(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    throw UsageError("--seed expects an integer from 0 to 2^64 - 1, got '" + text + "'");
  }
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value (see rstr-run --help)");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--out") {
      a.out = value();
    } else if (arg == "--png") {
      a.png = value();
    } else if (arg == "--images") {
      a.images = value();
    } else if (arg == "--png-scale") {
      a.png_scale = static_cast<int>(parse_int(arg, value()));
      if (a.png_scale < 1 || a.png_scale > 64) throw UsageError("--png-scale must be between 1 and 64");
    } else if (arg == "--class") {
      std::stringstream ss(value());
      for (std::string item; std::getline(ss, item, ',');) a.classes.push_back(parse_int(arg, item));
    } else if (arg == "--cond") {
      a.cond.push_back(value());
    } else if (arg == "--uncond") {
      a.uncond.push_back(value());
    } else if (arg == "--seed") {
      a.seed = parse_seed(value());
    } else if (arg == "--noise") {
      a.noise = value();
    } else if (arg == "--backend") {
      const std::string b = value();
      if (b == "cpu") a.backend = rstr::Backend::OnnxRuntimeCpu;
      else if (b == "cuda") a.backend = rstr::Backend::OnnxRuntimeCuda;
      else if (b == "tensorrt") a.backend = rstr::Backend::TensorRT;
      else throw UsageError("--backend is '" + b + "'; choose cpu, cuda or tensorrt");
    } else if (arg == "--threads") {
      a.options.cpu_threads = static_cast<int>(parse_int(arg, value()));
    } else if (arg == "--device") {
      a.options.device_id = static_cast<int>(parse_int(arg, value()));
    } else if (arg == "--trust-engine-host-code") {
      a.options.engine_host_code = rstr::EngineHostCode::Allow;
    } else if (arg.rfind("-", 0) == 0) {
      throw UsageError("unknown option " + arg + " (see rstr-run --help)");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 1) throw UsageError("expected one BUNDLE directory (see rstr-run --help)");
  a.bundle = positional[0];
  if (a.out.empty()) throw UsageError("--out FILE.npy (latents) or FILE.png (images) is required");
  const auto ends = [](const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  if (ends(a.out, ".png")) {
    if (!a.png.empty()) throw UsageError("--out is a .png already; drop --png");
    a.png = a.out;
    a.out.clear();
  } else if (!ends(a.out, ".npy")) {
    throw UsageError("--out " + a.out + ": use FILE.npy (latents) or FILE.png (images)");
  }
  if (a.seed.has_value() == !a.noise.empty()) throw UsageError("give exactly one of --seed S and --noise NOISE.npy");
  if (!a.classes.empty() && !a.cond.empty()) throw UsageError("give --class or --cond, not both");
  return a;
}

/// "NAME=FILE" -> (NAME, FILE); a bare FILE names the bundle's only conditioning input.
std::pair<std::string, std::string> split_named(const std::string& flag, const std::string& text, const rstr::Manifest& m) {
  const size_t eq = text.find('=');
  if (eq != std::string::npos) return {text.substr(0, eq), text.substr(eq + 1)};
  if (m.conditioning.size() != 1)
    throw UsageError(flag + " " + text + ": this bundle has " + std::to_string(m.conditioning.size()) +
                     " conditioning inputs; name each one as NAME=FILE.npy");
  return {m.conditioning[0].info.name, text};
}

rstr::Conditioning load_named(const std::string& flag, const std::vector<std::string>& items, const rstr::Manifest& m) {
  rstr::Conditioning out;
  for (const auto& item : items) {
    auto [name, file] = split_named(flag, item, m);
    if (out.count(name)) throw UsageError(flag + " gives '" + name + "' twice");
    out.emplace(name, rstr::npy::read(file));
  }
  return out;
}

rstr::Conditioning class_conditioning(const std::vector<int64_t>& classes, const rstr::Manifest& m) {
  if (m.conditioning.size() != 1 || m.conditioning[0].info.dtype != rstr::DType::Int64 ||
      m.conditioning[0].info.shape.size() != 1)
    throw UsageError("--class needs a class-conditional bundle (one int64 input of shape [B]); this one takes " +
                     std::to_string(m.conditioning.size()) + " conditioning input(s): use --cond");
  std::vector<int64_t> labels = classes;
  if (labels.size() == 1) labels.assign(static_cast<size_t>(m.batch), classes[0]);
  if (static_cast<int64_t>(labels.size()) != m.batch)
    throw UsageError("--class gives " + std::to_string(classes.size()) + " labels; this bundle runs batch " +
                     std::to_string(m.batch) + " (give 1 or " + std::to_string(m.batch) + ")");
  return {{m.conditioning[0].info.name, rstr::Tensor::int64({m.batch}, std::move(labels))}};
}

void require_decoder(const rstr::Decoder& d, const std::string& flag) {
  if (d.kind != rstr::DecoderKind::Pixels && d.kind != rstr::DecoderKind::Vae)
    throw UsageError(flag + " needs a bundle with a decoder (\"pixels\" or \"vae\"); this one returns latents only: "
                     "write them with --out FILE.npy");
}

/// Images [B, H, W, C] in [0, 1] side by side as one 8-bit PNG, upscaled `scale` times.
void write_png(const std::string& path, const rstr::Tensor& images, int scale) {
  const auto& s = images.shape();
  if (s.size() != 4 || (s[3] != 1 && s[3] != 3))
    throw rstr::Error("a PNG needs images [B, H, W, 1 or 3], got " + rstr::shape_string(s));
  const int64_t B = s[0], H = s[1], W = s[2], C = s[3];
  if (scale == 0) scale = H < 64 ? 8 : 1;
  const int64_t width = B * W * scale, height = H * scale;
  std::vector<png_byte> pixels(static_cast<size_t>(width * height * C));
  const std::vector<float>& v = images.f32();
  for (int64_t y = 0; y < height; ++y)
    for (int64_t col = 0; col < width; ++col) {
      const int64_t b = col / (W * scale), w = (col % (W * scale)) / scale, h = y / scale;
      for (int64_t c = 0; c < C; ++c) {
        float t = v[static_cast<size_t>(((b * H + h) * W + w) * C + c)];
        t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
        pixels[static_cast<size_t>((y * width + col) * C + c)] = static_cast<png_byte>(t * 255.0f + 0.5f);
      }
    }
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = C == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  rstr::io::write_atomically(path, [&](std::FILE* out) {
    if (!png_image_write_to_stdio(&image, out, 0, pixels.data(), 0, nullptr))
      throw rstr::Error("cannot write " + path + ": " + image.message);
  });
}

int run(const Args& a) {
  const rstr::Bundle bundle = rstr::Bundle::open(a.bundle);
  const rstr::Manifest& m = bundle.manifest();
  if (!a.png.empty()) require_decoder(m.decoder, "--png");  // before the work, not after it
  if (!a.images.empty()) require_decoder(m.decoder, "--images");

  rstr::Conditioning cond, uncond = load_named("--uncond", a.uncond, m);
  if (!a.classes.empty()) cond = class_conditioning(a.classes, m);
  else if (!a.cond.empty()) cond = load_named("--cond", a.cond, m);
  else if (!m.conditioning.empty()) throw UsageError("this bundle needs conditioning: give --class or --cond");

  rstr::Tensor noise = a.seed ? rstr::seeded_noise(*a.seed, m.sample.shape) : rstr::npy::read(a.noise);

  const auto start = std::chrono::steady_clock::now();
  rstr::Runner runner(bundle, a.backend, a.options);
  const rstr::Tensor latents = runner.run(noise, cond, uncond);
  const bool decode = !a.png.empty() || !a.images.empty();
  const rstr::Tensor images = decode ? runner.decode(latents) : rstr::Tensor();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::string wrote;
  const auto note = [&](const std::string& file) { wrote += (wrote.empty() ? "" : ", ") + file; };
  if (!a.out.empty()) {
    rstr::npy::write(a.out, latents);
    note(a.out);
  }
  if (!a.images.empty()) {
    rstr::npy::write(a.images, images);
    note(a.images);
  }
  if (!a.png.empty()) {
    write_png(a.png, images, a.png_scale);
    note(a.png);
  }
  std::printf("rstr-run: %zu steps (%d guided) on %s in %.2f s -> %s\n", m.plan.steps.size(), m.plan.num_guided(),
              rstr::backend_name(a.backend), seconds, wrote.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const rstr::Error& e) {
    std::fprintf(stderr, "rstr-run: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {  // a bug, not a user error: say so
    std::fprintf(stderr, "rstr-run: internal error: %s\n", e.what());
    return 1;
  }
}
