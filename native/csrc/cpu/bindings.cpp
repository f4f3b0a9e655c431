// Python bindings of the CPU kernels (module ds_native._ds_native_cpu).
// Tensors arrive through DLPack as nb::ndarray; no dependency on torch's C++ ABI.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace nb = nanobind;

using CpuArray = nb::ndarray<nb::device::cpu, nb::c_contig, nb::ro>;

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
}
