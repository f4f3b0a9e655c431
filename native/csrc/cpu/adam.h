// CPU Adam/AdamW: per-element arithmetic shared by every ISA variant.
//
// The host side (adam_dispatch.cpp) turns the optimizer's hyperparameters into
// AdamCoeffs (adam_coeffs.h) once per tensor and step, then cuts the tensors
// into fixed slices that threads update with the kernel of the active ISA
// (adam_isa.cpp, compiled once per ISA).
#pragma once
#include <cstdint>

#include "adam_coeffs.h"
#include "cpu/dispatch.h"

namespace ds {

// Elements [0, n) of one tensor: params, moments and optional copy-out.
struct AdamSlice {
  float* param;
  const void* grad;  // grad_dtype
  float* exp_avg;
  float* exp_avg_sq;
  void* out;         // nullptr, or out_dtype (bf16/f16): the updated params rounded to nearest even
  int64_t n;
  DType grad_dtype;
  DType out_dtype;
  const AdamCoeffs* coeffs;
};

// One whole tensor for adam_step().
struct AdamTensor {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* out;
  int64_t numel;
  DType grad_dtype;
  DType out_dtype;
  AdamCoeffs coeffs;
};

// Update every tensor in place, spread over num_threads (0: OpenMP's default).
// Bitwise deterministic: each element's arithmetic does not depend on the
// thread count, the slice it falls in, or the ISA.
void adam_step(const std::vector<AdamTensor>& tensors, int num_threads);

// Bandwidth probe with Adam's memory-access shape: reads a, b, c, d and writes
// a, c, d back (28 bytes per element in fp32), same threading as adam_step.
void stream_adam_shape(float* a, const float* b, float* c, float* d, int64_t n, int num_threads);

}  // namespace ds
