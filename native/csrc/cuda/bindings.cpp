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

namespace {

int dtype_code(const CudaArray& a, size_t index) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return 0;
  if (dt.bits == 16 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return 1;
  if (dt.bits == 16 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return 2;
  throw std::invalid_argument("tensor " + std::to_string(index) + ": dtype must be float32, bfloat16 or float16");
}

constexpr int64_t kSliceElems = 1 << 16;

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
}
