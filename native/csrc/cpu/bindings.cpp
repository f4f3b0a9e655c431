// Python bindings of the CPU kernels (module ds_native._ds_native_cpu).
// Tensors arrive through DLPack as nb::ndarray, or (adam_step) as checked raw
// addresses; no dependency on torch's C++ ABI.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/adam.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace nb = nanobind;

// onebit_bindings.cpp: the 1-bit compression kernels.
void bind_onebit(nb::module_& m);

using CpuArray = nb::ndarray<nb::device::cpu, nb::c_contig, nb::ro>;
// Buffers updated in place: exact dtype, contiguous, never a converted copy
// (the bindings that take them use .noconvert()).
using F32Array = nb::ndarray<float, nb::device::cpu, nb::c_contig>;

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

// One tensor's entry in adam_step's flat record list (int64 fields, in order).
// Raw addresses, not DLPack: exporting four tensors per parameter through
// torch's __dlpack__ cost more than the kernel saves on a 10M-element tensor
// once the step has flushed the caches (~250 us of Python per call).
enum AdamRecordField : size_t {
  kParam,       // float32*
  kGrad,        // grad dtype (see kDtypes)
  kExpAvg,      // float32*
  kExpAvgSq,    // float32*
  kOut,         // bf16/fp16 copy-out, or 0
  kStepPtr,     // float32 scalar incremented in place (torch's state["step"]), or 0: use kStep
  kStep,        // the step count after this update when kStepPtr is 0
  kNumel,
  kDtypes,      // grad dtype | out dtype << 8, as DType values
  kRecordSize,
};

ds::DType dtype_field(int64_t code, const char* what, size_t i) {
  if (code == static_cast<int64_t>(ds::DType::f32)) return ds::DType::f32;
  if (code == static_cast<int64_t>(ds::DType::bf16)) return ds::DType::bf16;
  if (code == static_cast<int64_t>(ds::DType::f16)) return ds::DType::f16;
  throw std::invalid_argument("adam_step: record " + std::to_string(i) + ": invalid " + what + " dtype code " +
                              std::to_string(code));
}

void adam_step_binding(const std::vector<int64_t>& records, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool adamw_mode, bool bias_correction, int num_threads) {
  if (records.size() % kRecordSize != 0) {
    throw std::invalid_argument("adam_step: records must hold " + std::to_string(kRecordSize) +
                                " int64 fields per tensor");
  }
  const size_t count = records.size() / kRecordSize;
  std::vector<ds::AdamTensor> tensors;
  tensors.reserve(count);
  // Validate everything before touching any step counter, so a bad record changes nothing.
  for (size_t i = 0; i < count; ++i) {
    const int64_t* r = records.data() + i * kRecordSize;
    ds::AdamTensor t{};
    t.numel = r[kNumel];
    if (t.numel < 0) throw std::invalid_argument("adam_step: record " + std::to_string(i) + ": negative numel");
    t.grad_dtype = dtype_field(r[kDtypes] & 0xff, "grad", i);
    t.out_dtype = dtype_field(r[kDtypes] >> 8, "out", i);
    if (r[kOut] != 0 && t.out_dtype == ds::DType::f32) {
      throw std::invalid_argument("adam_step: record " + std::to_string(i) + ": out must be bfloat16 or float16");
    }
    if (t.numel > 0 && (r[kParam] == 0 || r[kGrad] == 0 || r[kExpAvg] == 0 || r[kExpAvgSq] == 0)) {
      throw std::invalid_argument("adam_step: record " + std::to_string(i) + ": null tensor address");
    }
    if (r[kStepPtr] == 0 && r[kStep] < 1) {
      throw std::invalid_argument("adam_step: record " + std::to_string(i) + ": step must be >= 1");
    }
    t.param = reinterpret_cast<float*>(r[kParam]);
    t.grad = reinterpret_cast<const void*>(r[kGrad]);
    t.exp_avg = reinterpret_cast<float*>(r[kExpAvg]);
    t.exp_avg_sq = reinterpret_cast<float*>(r[kExpAvgSq]);
    t.out = reinterpret_cast<void*>(r[kOut]);
    tensors.push_back(t);
  }
  for (size_t i = 0; i < count; ++i) {
    const int64_t* r = records.data() + i * kRecordSize;
    int64_t step = r[kStep];
    if (r[kStepPtr] != 0) {
      // torch keeps the count as a float32 tensor (exact to 2^24 steps).
      float* counter = reinterpret_cast<float*>(r[kStepPtr]);
      *counter += 1.0f;
      step = static_cast<int64_t>(*counter);
    }
    tensors[i].coeffs =
        ds::make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction, step);
  }
  nb::gil_scoped_release release;
  ds::adam_step(tensors, num_threads);
}

// Ask Linux to back the whole huge pages inside [address, address + nbytes)
// with transparent huge pages (madvise MADV_HUGEPAGE); the partial pages at
// either end are left alone. Returns the bytes advised: 0 where the range holds
// no whole huge page, the kernel refuses, or the platform has no THP.
int64_t advise_huge_pages(uintptr_t address, int64_t nbytes, int64_t huge_page_bytes) {
  if (nbytes <= 0 || huge_page_bytes <= 0 || (huge_page_bytes & (huge_page_bytes - 1)) != 0) return 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t mask = static_cast<uintptr_t>(huge_page_bytes) - 1;
  const uintptr_t begin = (address + mask) & ~mask;
  const uintptr_t end = (address + static_cast<uintptr_t>(nbytes)) & ~mask;
  if (end <= begin) return 0;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return 0;
  return static_cast<int64_t>(end - begin);
#else
  (void)address;
  return 0;
#endif
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

  m.def("adam_step", &adam_step_binding, nb::arg("records"), nb::arg("lr"), nb::arg("beta1"), nb::arg("beta2"),
        nb::arg("eps"), nb::arg("weight_decay"), nb::arg("adamw_mode"), nb::arg("bias_correction"),
        nb::arg("num_threads") = 0,
        "Adam/AdamW step in place over tensors given by address: 9 int64 fields per tensor (param, grad, "
        "exp_avg, exp_avg_sq, out or 0, step counter or 0, step, numel, grad dtype | out dtype << 8). "
        "Internal: the caller checks dtypes, devices, sizes and contiguity and keeps the tensors alive "
        "(ds_native.optim.cpu_adam does). The GIL is released while the kernel runs.");

  m.def("advise_huge_pages", &advise_huge_pages, nb::arg("address"), nb::arg("nbytes"), nb::arg("huge_page_bytes"),
        "madvise(MADV_HUGEPAGE) on the whole huge pages inside a buffer; returns the bytes advised "
        "(0: none, refused, or not Linux). Internal: ds_native.memory is the API.");

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

  bind_onebit(m);
}
