// rstr's seeded noise, the C++ twin of engines/noise.py (docs/seeding.md): Philox4x32-10 keyed by
// the seed, block n = the cipher of counter (n mod 2^32, n div 2^32, 0, 0), Box-Muller in double on
// the word pairs (x0, x1) and (x2, x3), rounded to float.  Every operation is spelled as in the
// numpy version, so the two give the same floats.
#include <array>
#include <cmath>

#include "rstr/runtime.hpp"

namespace rstr {
namespace {

using Block = std::array<uint32_t, 4>;

Block philox4x32_10(Block c, uint32_t k0, uint32_t k1) {
  constexpr uint64_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = kM0 * c[0], p1 = kM1 * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0, static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1, static_cast<uint32_t>(p0)};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

double uniform(uint32_t x) { return (static_cast<double>(x) + 0.5) * 0x1p-32; }

}  // namespace

Tensor seeded_noise(uint64_t seed, const std::vector<int64_t>& shape) {
  int64_t size = 1;
  for (int64_t d : shape) {
    if (d < 0) throw InputError("seeded_noise: negative dimension in shape " + shape_string(shape));
    size *= d;
  }
  constexpr double kTwoPi = 2.0 * 3.14159265358979323846;
  const auto k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  std::vector<float> values(static_cast<size_t>(size));
  for (int64_t i = 0; i < size; i += 4) {
    const auto n = static_cast<uint64_t>(i / 4);
    const Block w = philox4x32_10({static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u}, k0, k1);
    double z[4];
    for (int pair = 0; pair < 2; ++pair) {
      const double r = std::sqrt(-2.0 * std::log(uniform(w[2 * pair])));
      const double angle = kTwoPi * uniform(w[2 * pair + 1]);
      z[2 * pair] = r * std::cos(angle);
      z[2 * pair + 1] = r * std::sin(angle);
    }
    for (int64_t j = 0; j < 4 && i + j < size; ++j) values[static_cast<size_t>(i + j)] = static_cast<float>(z[j]);
  }
  return Tensor::float32(shape, std::move(values));
}

}  // namespace rstr
