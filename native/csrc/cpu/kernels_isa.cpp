// Kernel bodies, compiled once per ISA with that ISA's flags (DS_ISA_NS names
// the namespace). Plain loops written so the compiler vectorizes them for the
// target; the dispatch layer decides which copy runs.
#include <cstring>

#include "cpu/kernels.h"

#ifndef DS_ISA_NS
#error "DS_ISA_NS must name the ISA namespace"
#endif

namespace ds::DS_ISA_NS {
namespace {

// Accumulate this many elements in float lanes before folding into double:
// keeps the vector loop fast while bounding float rounding error growth.
constexpr int64_t kFloatBlock = 1024;

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline float f16_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

template <typename Load, typename T>
double sum_squares_impl(const T* x, int64_t n, Load load) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kFloatBlock) {
    const int64_t stop = start + kFloatBlock < n ? start + kFloatBlock : n;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = start; i < stop; ++i) {
      const float v = load(x[i]);
      acc += v * v;
    }
    total += static_cast<double>(acc);
  }
  return total;
}

}  // namespace

double sum_squares_f32(const float* x, int64_t n) {
  return sum_squares_impl(x, n, [](float v) { return v; });
}

double sum_squares_bf16(const uint16_t* x, int64_t n) {
  return sum_squares_impl(x, n, bf16_to_float);
}

double sum_squares_f16(const uint16_t* x, int64_t n) {
  return sum_squares_impl(x, n, f16_to_float);
}

}  // namespace ds::DS_ISA_NS
