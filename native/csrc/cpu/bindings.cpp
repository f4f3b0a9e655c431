// Python bindings of the CPU kernels (module ds_native._ds_native_cpu).
// Tensors arrive through DLPack as nb::ndarray; no dependency on torch's C++ ABI.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/adam.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace nb = nanobind;

using CpuArray = nb::ndarray<nb::device::cpu, nb::c_contig, nb::ro>;
// Buffers updated in place: exact dtype, contiguous, never a converted copy
// (the bindings that take them use .noconvert()).
using F32Array = nb::ndarray<float, nb::device::cpu, nb::c_contig>;
using OutArray = nb::ndarray<nb::device::cpu, nb::c_contig>;

namespace {

ds::DType dtype_of(const CpuArray& a, size_t index) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return ds::DType::f32;
  if (dt.bits == 16 && dt.lanes == 1) {
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return ds::DType::bf16;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return ds::DType::f16;
  }
  throw std::invalid_argument("tensor " + std::to_string(index) +
                              ": dtype must be float32, bfloat16 or float16");
}

void check_same_numel(const char* what, size_t i, int64_t got, int64_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string(what) + "[" + std::to_string(i) + "] has " + std::to_string(got) +
                                " elements, but params[" + std::to_string(i) + "] has " + std::to_string(want));
  }
}

void adam_step_binding(const std::vector<F32Array>& params, const std::vector<CpuArray>& grads,
                       const std::vector<F32Array>& exp_avgs, const std::vector<F32Array>& exp_avg_sqs,
                       const std::vector<OutArray>& outs, const std::vector<int64_t>& steps, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool adamw_mode, bool bias_correction,
                       int num_threads) {
  const size_t count = params.size();
  if (grads.size() != count || exp_avgs.size() != count || exp_avg_sqs.size() != count || steps.size() != count ||
      (!outs.empty() && outs.size() != count)) {
    throw std::invalid_argument("adam_step: params, grads, exp_avgs, exp_avg_sqs, steps (and outs unless empty) "
                                "must have the same length");
  }
  std::vector<ds::AdamTensor> tensors;
  tensors.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = static_cast<int64_t>(params[i].size());
    check_same_numel("grads", i, static_cast<int64_t>(grads[i].size()), n);
    check_same_numel("exp_avgs", i, static_cast<int64_t>(exp_avgs[i].size()), n);
    check_same_numel("exp_avg_sqs", i, static_cast<int64_t>(exp_avg_sqs[i].size()), n);
    if (steps[i] < 1) throw std::invalid_argument("adam_step: steps[" + std::to_string(i) + "] must be >= 1");
    ds::AdamTensor t{};
    t.param = params[i].data();
    t.grad = grads[i].data();
    t.grad_dtype = dtype_of(grads[i], i);
    t.exp_avg = exp_avgs[i].data();
    t.exp_avg_sq = exp_avg_sqs[i].data();
    t.numel = n;
    t.out = nullptr;
    t.out_dtype = ds::DType::f32;
    if (!outs.empty()) {
      check_same_numel("outs", i, static_cast<int64_t>(outs[i].size()), n);
      const nb::dlpack::dtype dt = outs[i].dtype();
      const bool bf16 = dt.bits == 16 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat);
      const bool f16 = dt.bits == 16 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float);
      if (!bf16 && !f16) {
        throw std::invalid_argument("adam_step: outs[" + std::to_string(i) + "] must be bfloat16 or float16");
      }
      t.out = outs[i].data();
      t.out_dtype = bf16 ? ds::DType::bf16 : ds::DType::f16;
    }
    t.coeffs = ds::make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction, steps[i]);
    tensors.push_back(t);
  }
  nb::gil_scoped_release release;
  ds::adam_step(tensors, num_threads);
}

}  // namespace

NB_MODULE(_ds_native_cpu, m) {
  m.doc() = "ds-native CPU kernels with runtime ISA dispatch";

  m.def("isa_detected", [] { return std::string(ds::isa_name(ds::detect_isa())); },
        "Best ISA of this CPU among the compiled variants.");
  m.def("isa_active", [] { return std::string(ds::isa_name(ds::active_isa())); },
        "ISA the kernels run with now (DS_NATIVE_ISA or set_isa override, else detected).");
  m.def("set_isa", &ds::set_isa, nb::arg("name"),
        "Force 'scalar', 'avx2' or 'avx512' ('auto' restores detection).");
  m.def("isa_supported_by_cpu",
        [](const std::string& name) {
          for (ds::Isa isa : {ds::Isa::scalar, ds::Isa::avx2, ds::Isa::avx512})
            if (name == ds::isa_name(isa)) return ds::isa_supported_by_cpu(isa);
          throw std::invalid_argument("unknown ISA '" + name + "'");
        },
        nb::arg("name"));

  m.def(
      "multi_tensor_sum_squares",
      [](const std::vector<CpuArray>& tensors, int num_threads) {
        std::vector<ds::TensorView> views;
        views.reserve(tensors.size());
        for (size_t i = 0; i < tensors.size(); ++i) {
          views.push_back({tensors[i].data(), static_cast<int64_t>(tensors[i].size()),
                           dtype_of(tensors[i], i)});
        }
        nb::gil_scoped_release release;
        return ds::multi_tensor_sum_squares(views, num_threads);
      },
      nb::arg("tensors"), nb::arg("num_threads") = 0,
      "Sum of squares over contiguous CPU tensors (fp32/bf16/fp16), double accumulation.");

  m.def("adam_step", &adam_step_binding, nb::arg("params").noconvert(), nb::arg("grads"),
        nb::arg("exp_avgs").noconvert(), nb::arg("exp_avg_sqs").noconvert(), nb::arg("outs").noconvert(),
        nb::arg("steps"), nb::arg("lr"), nb::arg("beta1"), nb::arg("beta2"), nb::arg("eps"), nb::arg("weight_decay"),
        nb::arg("adamw_mode"), nb::arg("bias_correction"), nb::arg("num_threads") = 0,
        "Adam/AdamW step over contiguous CPU tensors in place (fp32 params and moments; fp32/bf16/fp16 grads), "
        "with optional bf16/fp16 copy-out of the updated params. steps[i] is tensor i's step count after this "
        "update. The GIL is released while the kernel runs.");

  m.def(
      "stream_adam_shape",
      [](F32Array a, F32Array b, F32Array c, F32Array d, int num_threads) {
        const int64_t n = static_cast<int64_t>(a.size());
        if (b.size() != a.size() || c.size() != a.size() || d.size() != a.size())
          throw std::invalid_argument("stream_adam_shape: a, b, c, d must have the same number of elements");
        nb::gil_scoped_release release;
        ds::stream_adam_shape(a.data(), b.data(), c.data(), d.data(), n, num_threads);
      },
      nb::arg("a").noconvert(), nb::arg("b").noconvert(), nb::arg("c").noconvert(), nb::arg("d").noconvert(),
      nb::arg("num_threads") = 0,
      "Bandwidth probe with Adam's access shape: reads a, b, c, d, writes a, c, d (28 bytes per element).");
}
