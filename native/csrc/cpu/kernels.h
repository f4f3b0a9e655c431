// Declarations of the per-ISA kernel sets. kernels_isa.cpp and adam_isa.cpp
// define each of them once per ISA namespace; dispatch.cpp and
// adam_dispatch.cpp pick one at run time.
#pragma once
#include <cstdint>

namespace ds {
struct AdamSlice;
}

#define DS_DECLARE_ISA_KERNELS(ns)                                                 \
  namespace ds::ns {                                                               \
  /* Sum of squares of n elements, accumulated in double per block. */            \
  double sum_squares_f32(const float* x, int64_t n);                               \
  double sum_squares_bf16(const uint16_t* x, int64_t n);                           \
  double sum_squares_f16(const uint16_t* x, int64_t n);                            \
  /* Adam/AdamW update of one slice, in place (adam_isa.cpp). */                   \
  void adam_update(const ds::AdamSlice& s);                                        \
  /* a = a*k + b, c += b, d = d*k + b: Adam's four streams, three written back. */ \
  void stream_adam_shape(float* a, const float* b, float* c, float* d, int64_t n); \
  }

DS_DECLARE_ISA_KERNELS(scalar)
DS_DECLARE_ISA_KERNELS(avx2)
DS_DECLARE_ISA_KERNELS(avx512)
