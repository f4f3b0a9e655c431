// Multi-tensor sum of squares on CUDA: one launch covers many tensors.
// Each block reduces a slice of one tensor into a double partial; the caller
// sums the partials (deterministic: no atomics, fixed block-to-slice mapping).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/kernels.h"

namespace ds::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ double block_slice_sum_squares(const T* x, int64_t begin, int64_t end) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = to_float(x[i]);
    acc += static_cast<double>(v * v);
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

__global__ void sum_squares_kernel(const TensorTable table, double* partials) {
  // blockIdx.x enumerates (tensor, slice) pairs laid out by the host.
  const int block = blockIdx.x;
  int t = 0;
  while (t + 1 < table.count && table.first_block[t + 1] <= block) ++t;
  const int64_t slice = block - table.first_block[t];
  const int64_t begin = slice * table.slice_elems;
  int64_t end = begin + table.slice_elems;
  if (end > table.numel[t]) end = table.numel[t];
  double s = 0.0;
  switch (table.dtype[t]) {
    case 0: s = block_slice_sum_squares(static_cast<const float*>(table.ptr[t]), begin, end); break;
    case 1: s = block_slice_sum_squares(static_cast<const __nv_bfloat16*>(table.ptr[t]), begin, end); break;
    default: s = block_slice_sum_squares(static_cast<const __half*>(table.ptr[t]), begin, end); break;
  }
  if (threadIdx.x == 0) partials[block] = s;
}

}  // namespace

void launch_sum_squares(const TensorTable& table, double* partials, int total_blocks, uintptr_t stream) {
  if (total_blocks == 0) return;
  sum_squares_kernel<<<total_blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(table, partials);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("sum_squares launch failed: ") + cudaGetErrorString(err));
}

}  // namespace ds::cuda
