// Python bindings of the CUDA kernels (module ds_native._ds_native_cuda).
// Imported lazily by ds_native.cuda_ops, only when a CUDA tensor needs it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace nb = nanobind;

using CudaArray = nb::ndarray<nb::device::cuda, nb::c_contig, nb::ro>;
using CudaF64 = nb::ndarray<nb::device::cuda, nb::c_contig, double, nb::ndim<1>>;
// Updated in place: exact dtype, contiguous, never a converted copy (.noconvert()).
using CudaRW = nb::ndarray<nb::device::cuda, nb::c_contig>;
using CudaF32 = nb::ndarray<float, nb::device::cuda, nb::c_contig>;

namespace {

template <typename Array>
int dtype_code(const Array& a, size_t index) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return 0;
  if (dt.bits == 16 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return 1;
  if (dt.bits == 16 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return 2;
  throw std::invalid_argument("tensor " + std::to_string(index) + ": dtype must be float32, bfloat16 or float16");
}

constexpr int64_t kSliceElems = 1 << 16;

void check_numel(const char* what, size_t i, size_t got, size_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string("fused_adam: ") + what + "[" + std::to_string(i) + "] has " +
                                std::to_string(got) + " elements, params[" + std::to_string(i) + "] has " +
                                std::to_string(want));
  }
}

void fused_adam_binding(const std::vector<CudaRW>& params, const std::vector<CudaArray>& grads,
                        const std::vector<CudaF32>& exp_avgs, const std::vector<CudaF32>& exp_avg_sqs, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool adamw_mode,
                        bool bias_correction, int64_t step, uintptr_t stream) {
  const size_t count = params.size();
  if (grads.size() != count || exp_avgs.size() != count || exp_avg_sqs.size() != count)
    throw std::invalid_argument("fused_adam: params, grads, exp_avgs and exp_avg_sqs must have the same length");
  if (count == 0) return;
  if (step < 1) throw std::invalid_argument("fused_adam: step must be >= 1");
  const int param_dtype = dtype_code(params[0], 0);
  const int grad_dtype = dtype_code(grads[0], 0);
  const ds::AdamCoeffs coeffs =
      ds::make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction, step);
  ds::cuda::AdamTable table{};
  int blocks = 0;
  auto flush = [&] {
    ds::cuda::launch_fused_adam(table, blocks, param_dtype, grad_dtype, coeffs, stream);
    table.count = 0;
    blocks = 0;
  };
  for (size_t i = 0; i < count; ++i) {
    const size_t n = params[i].size();
    check_numel("grads", i, grads[i].size(), n);
    check_numel("exp_avgs", i, exp_avgs[i].size(), n);
    check_numel("exp_avg_sqs", i, exp_avg_sqs[i].size(), n);
    if (dtype_code(params[i], i) != param_dtype || dtype_code(grads[i], i) != grad_dtype)
      throw std::invalid_argument("fused_adam: every param (and every grad) of one call must share a dtype");
    if (n == 0) continue;
    if (table.count == ds::cuda::kMaxAdamTensors) flush();
    const int c = table.count++;
    table.param[c] = params[i].data();
    table.grad[c] = grads[i].data();
    table.exp_avg[c] = exp_avgs[i].data();
    table.exp_avg_sq[c] = exp_avg_sqs[i].data();
    table.numel[c] = static_cast<int64_t>(n);
    table.first_block[c] = blocks;
    blocks += static_cast<int>((static_cast<int64_t>(n) + ds::cuda::kAdamChunk - 1) / ds::cuda::kAdamChunk);
  }
  if (table.count > 0) flush();
}

}  // namespace

NB_MODULE(_ds_native_cuda, m) {
  m.doc() = "ds-native CUDA kernels";
  m.attr("slice_elems") = kSliceElems;

  m.def("partials_needed",
        [](const std::vector<int64_t>& numels) {
          int64_t blocks = 0;
          for (int64_t n : numels) blocks += (n + kSliceElems - 1) / kSliceElems;
          return blocks;
        },
        "Length of the float64 partials buffer multi_tensor_sum_squares needs.");

  m.def(
      "multi_tensor_sum_squares",
      [](const std::vector<CudaArray>& tensors, CudaF64 partials, uintptr_t stream) {
        ds::cuda::TensorTable table{};
        table.slice_elems = kSliceElems;
        int64_t written = 0;
        auto flush = [&](int blocks) {
          if (written + blocks > static_cast<int64_t>(partials.shape(0)))
            throw std::invalid_argument("partials buffer too small");
          ds::cuda::launch_sum_squares(table, partials.data() + written, blocks, stream);
          written += blocks;
          table.count = 0;
        };
        int blocks = 0;
        for (size_t i = 0; i < tensors.size(); ++i) {
          const int64_t n = static_cast<int64_t>(tensors[i].size());
          if (n == 0) continue;
          if (table.count == ds::cuda::kMaxTensorsPerLaunch) {
            flush(blocks);
            blocks = 0;
          }
          const int c = table.count++;
          table.ptr[c] = tensors[i].data();
          table.numel[c] = n;
          table.dtype[c] = dtype_code(tensors[i], i);
          table.first_block[c] = blocks;
          blocks += static_cast<int>((n + kSliceElems - 1) / kSliceElems);
        }
        if (table.count > 0) flush(blocks);
        return written;
      },
      nb::arg("tensors"), nb::arg("partials"), nb::arg("stream"),
      "Write per-slice sums of squares into `partials` on `stream`; returns how many were written.");

  m.def("fused_adam", &fused_adam_binding, nb::arg("params").noconvert(), nb::arg("grads"),
        nb::arg("exp_avgs").noconvert(), nb::arg("exp_avg_sqs").noconvert(), nb::arg("lr"), nb::arg("beta1"),
        nb::arg("beta2"), nb::arg("eps"), nb::arg("weight_decay"), nb::arg("adamw_mode"),
        nb::arg("bias_correction"), nb::arg("step"), nb::arg("stream"),
        "Multi-tensor Adam/AdamW step in place on `stream` (params fp32/bf16/fp16, one dtype per call; grads "
        "one dtype per call; fp32 moments). `step` is the step count after this update.");
}
