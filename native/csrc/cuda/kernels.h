// Host-side declarations of the CUDA kernels.
#pragma once
#include <cstdint>

namespace ds::cuda {

// Tensors per launch. The table travels as a kernel argument (4 KiB limit),
// so the host splits longer lists into several launches.
constexpr int kMaxTensorsPerLaunch = 64;

struct TensorTable {
  const void* ptr[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int first_block[kMaxTensorsPerLaunch];
  int dtype[kMaxTensorsPerLaunch];  // 0 = f32, 1 = bf16, 2 = f16
  int count;
  int64_t slice_elems;
};

void launch_sum_squares(const TensorTable& table, double* partials, int total_blocks, uintptr_t stream);

}  // namespace ds::cuda

#include "adam_coeffs.h"

namespace ds::cuda {

// Tensors per fused-Adam launch; four pointers each, so the table stays well
// under the 4 KiB kernel-argument limit. Longer lists take several launches.
constexpr int kMaxAdamTensors = 48;

// dtype codes as in TensorTable: 0 = f32, 1 = bf16, 2 = f16.
struct AdamTable {
  void* param[kMaxAdamTensors];
  const void* grad[kMaxAdamTensors];
  float* exp_avg[kMaxAdamTensors];
  float* exp_avg_sq[kMaxAdamTensors];
  int64_t numel[kMaxAdamTensors];
  int first_block[kMaxAdamTensors];
  int count;
};

// Elements each block updates.
constexpr int64_t kAdamChunk = 1 << 14;

// One launch: every tensor in `table` has params of param_dtype and grads of
// grad_dtype (fp32 moments) and takes the same step coefficients.
void launch_fused_adam(const AdamTable& table, int total_blocks, int param_dtype, int grad_dtype,
                       const ds::AdamCoeffs& coeffs, uintptr_t stream);

}  // namespace ds::cuda
