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
