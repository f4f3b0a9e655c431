// Multi-tensor fused Adam/AdamW on CUDA: one launch updates many tensors.
//
// Params may be fp32, bf16 or fp16 (the math runs in fp32 and the result is
// rounded to nearest even on store); moments are fp32; grads fp32/bf16/fp16.
// The per-element operations are those of the CPU kernel (csrc/cpu/adam_isa.cpp)
// and of aten's fused Adam; CUDA's default sqrt and division are IEEE
// correctly rounded, and the explicit fmaf calls fix where fusion happens.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/kernels.h"

namespace ds::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_as_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_as_float(const __half* p, int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store_from_float(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store_from_float(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_from_float(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }

// Which tensor block `b` belongs to: first_block is increasing.
__device__ __forceinline__ int tensor_of_block(const AdamTable& table, int b) {
  int lo = 0;
  int hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) fused_adam_kernel(const AdamTable table, const AdamCoeffs c) {
  const int t = tensor_of_block(table, blockIdx.x);
  const int64_t begin = static_cast<int64_t>(blockIdx.x - table.first_block[t]) * kAdamChunk;
  const int64_t end = min(begin + kAdamChunk, table.numel[t]);
  P* __restrict__ param = static_cast<P*>(table.param[t]);
  const G* __restrict__ grad = static_cast<const G*>(table.grad[t]);
  float* __restrict__ m = table.exp_avg[t];
  float* __restrict__ v = table.exp_avg_sq[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float g = load_as_float(grad, i);
    float p = load_as_float(param, i);
    if (c.mode == 1) {
      g = fmaf(p, c.weight_decay, g);
    } else if (c.mode == 2) {
      p = __fmul_rn(p, c.decay_factor);
    }
    float mi = m[i];
    const float diff = __fsub_rn(g, mi);
    mi = c.lerp_from_grad ? fmaf(c.lerp_coeff, diff, g) : fmaf(c.lerp_coeff, diff, mi);
    float vi = fmaf(v[i], c.beta2, __fmul_rn(__fmul_rn(c.one_minus_beta2, g), g));
    const float denom = fmaf(__fsqrt_rn(vi), c.inv_bc2_sqrt, c.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(c.neg_step_size, mi), denom));
    m[i] = mi;
    v[i] = vi;
    store_from_float(param, i, p);
  }
}

template <typename P>
void launch_for_param(const AdamTable& table, int blocks, int grad_dtype, const AdamCoeffs& c, cudaStream_t s) {
  switch (grad_dtype) {
    case 0: fused_adam_kernel<P, float><<<blocks, kThreads, 0, s>>>(table, c); break;
    case 1: fused_adam_kernel<P, __nv_bfloat16><<<blocks, kThreads, 0, s>>>(table, c); break;
    case 2: fused_adam_kernel<P, __half><<<blocks, kThreads, 0, s>>>(table, c); break;
    default: throw std::invalid_argument("fused_adam: grad dtype code must be 0, 1 or 2");
  }
}

}  // namespace

void launch_fused_adam(const AdamTable& table, int total_blocks, int param_dtype, int grad_dtype,
                       const AdamCoeffs& coeffs, uintptr_t stream) {
  if (total_blocks == 0 || table.count == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (param_dtype) {
    case 0: launch_for_param<float>(table, total_blocks, grad_dtype, coeffs, s); break;
    case 1: launch_for_param<__nv_bfloat16>(table, total_blocks, grad_dtype, coeffs, s); break;
    case 2: launch_for_param<__half>(table, total_blocks, grad_dtype, coeffs, s); break;
    default: throw std::invalid_argument("fused_adam: param dtype code must be 0, 1 or 2");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fused_adam launch failed: ") + cudaGetErrorString(err));
}

}  // namespace ds::cuda
