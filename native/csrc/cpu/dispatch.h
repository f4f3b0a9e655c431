// Entry points that pick the per-ISA kernel and spread work over threads.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/isa.h"

namespace ds {

enum class DType { f32, bf16, f16 };

// A borrowed view of a contiguous CPU buffer; the caller keeps it alive.
struct TensorView {
  const void* data;
  int64_t numel;
  DType dtype;
};

// Sum of squares over all elements of all tensors (fp32 math, double
// accumulation). Deterministic: independent of thread count.
double multi_tensor_sum_squares(const std::vector<TensorView>& tensors, int num_threads);

}  // namespace ds
