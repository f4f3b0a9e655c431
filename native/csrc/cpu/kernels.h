// Declarations of the per-ISA kernel sets. kernels_isa.cpp defines each of
// them once per ISA namespace; dispatch.cpp picks one at run time.
#pragma once
#include <cstdint>

#define DS_DECLARE_ISA_KERNELS(ns)                                        \
  namespace ds::ns {                                                      \
  /* Sum of squares of n elements, accumulated in double per block. */   \
  double sum_squares_f32(const float* x, int64_t n);                      \
  double sum_squares_bf16(const uint16_t* x, int64_t n);                  \
  double sum_squares_f16(const uint16_t* x, int64_t n);                   \
  }

DS_DECLARE_ISA_KERNELS(scalar)
DS_DECLARE_ISA_KERNELS(avx2)
DS_DECLARE_ISA_KERNELS(avx512)
