// Python bindings of the 1-bit kernels (part of module ds_native._ds_native_cpu).
// Buffers arrive as raw addresses: the rows of a message buffer are strided
// (sign bytes then a scale), which DLPack's c_contig arrays cannot express, and
// the call is per collective on hot paths. ds_native.onebit checks dtypes,
// devices, sizes and contiguity and keeps the tensors alive.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/onebit.h"

namespace nb = nanobind;

namespace {

ds::DType dtype_code(int64_t code) {
  if (code == static_cast<int64_t>(ds::DType::f32)) return ds::DType::f32;
  if (code == static_cast<int64_t>(ds::DType::bf16)) return ds::DType::bf16;
  if (code == static_cast<int64_t>(ds::DType::f16)) return ds::DType::f16;
  throw std::invalid_argument("onebit_compensate: invalid dtype code " + std::to_string(code));
}

template <typename T>
T* ptr(uintptr_t address, const char* what) {
  if (address == 0) throw std::invalid_argument(std::string("onebit: null address for ") + what);
  return reinterpret_cast<T*>(address);
}

}  // namespace

void bind_onebit(nb::module_& m) {
  m.def(
      "onebit_compensate",
      [](uintptr_t x, int64_t x_dtype, uintptr_t err, int64_t numel, int64_t rows, int64_t row_len, int threads,
         uintptr_t out, int64_t out_stride) {
        const ds::DType dt = dtype_code(x_dtype);
        if (numel < 0 || rows < 1 || row_len < 0 || numel > rows * row_len)
          throw std::invalid_argument("onebit_compensate: need 0 <= numel <= rows * row_len");
        if (out != 0 && (row_len % 8 != 0 || out_stride < row_len / 8))
          throw std::invalid_argument("onebit_compensate: with out, row_len % 8 == 0 and out_stride >= row_len / 8");
        const void* xp = numel > 0 ? ptr<const void>(x, "x") : nullptr;
        float* ep = ptr<float>(err, "err");
        uint8_t* op = reinterpret_cast<uint8_t*>(out);  // 0: no signs
        nb::gil_scoped_release release;
        return ds::onebit_compensate(xp, dt, ep, numel, rows, row_len, op, out_stride, threads);
      },
      nb::arg("x"), nb::arg("x_dtype"), nb::arg("err"), nb::arg("numel"), nb::arg("rows"), nb::arg("row_len"),
      nb::arg("num_threads") = 0, nb::arg("out") = 0, nb::arg("out_stride") = 0,
      "err[:numel] += x; returns each row's sum of squares of err. Internal: ds_native.onebit is the API.");
  m.def(
      "onebit_pack",
      [](uintptr_t err, int64_t rows, int64_t row_len, uintptr_t out, int64_t out_stride,
         const std::vector<float>& scales, const std::vector<int64_t>& valid, int threads) {
        if (row_len % 8 != 0 || out_stride < row_len / 8)
          throw std::invalid_argument("onebit_pack: row_len must be a multiple of 8 and out_stride >= row_len / 8");
        float* ep = ptr<float>(err, "err");
        uint8_t* op = ptr<uint8_t>(out, "out");
        nb::gil_scoped_release release;
        ds::onebit_pack(ep, rows, row_len, op, out_stride, scales, valid, threads);
      },
      nb::arg("err"), nb::arg("rows"), nb::arg("row_len"), nb::arg("out"), nb::arg("out_stride"), nb::arg("scales"),
      nb::arg("valid"), nb::arg("num_threads") = 0,
      "Pack err's signs per row and subtract scale * sign from err. Internal: ds_native.onebit is the API.");
  m.def(
      "onebit_server",
      [](uintptr_t bits, int64_t bits_stride, const std::vector<float>& scales, uintptr_t server_err, int64_t row_len,
         int64_t valid, int threads) {
        if (row_len % 8 != 0 || bits_stride < row_len / 8 || scales.empty())
          throw std::invalid_argument("onebit_server: row_len a multiple of 8, bits_stride >= row_len / 8, W >= 1");
        const uint8_t* bp = ptr<const uint8_t>(bits, "bits");
        float* sp = ptr<float>(server_err, "server_err");
        nb::gil_scoped_release release;
        return ds::onebit_server(bp, bits_stride, scales, sp, row_len, valid, threads);
      },
      nb::arg("bits"), nb::arg("bits_stride"), nb::arg("scales"), nb::arg("server_err"), nb::arg("row_len"),
      nb::arg("valid"), nb::arg("num_threads") = 0,
      "server_err += average of W decoded rows; returns its sum of squares. Internal: see ds_native.onebit.");
  m.def(
      "onebit_server_sum_squares",
      [](uintptr_t bits, int64_t bits_stride, const std::vector<float>& scales, uintptr_t server_err, int64_t row_len,
         int64_t valid, int threads, uintptr_t out) {
        if (row_len % 8 != 0 || bits_stride < row_len / 8 || scales.empty())
          throw std::invalid_argument(
              "onebit_server_sum_squares: row_len a multiple of 8, bits_stride >= row_len / 8, W >= 1");
        const uint8_t* bp = ptr<const uint8_t>(bits, "bits");
        const float* sp = ptr<const float>(server_err, "server_err");
        uint8_t* op = reinterpret_cast<uint8_t*>(out);  // 0: no signs
        nb::gil_scoped_release release;
        return ds::onebit_server_sum_squares(bp, bits_stride, scales, sp, row_len, valid, op, threads);
      },
      nb::arg("bits"), nb::arg("bits_stride"), nb::arg("scales"), nb::arg("server_err"), nb::arg("row_len"),
      nb::arg("valid"), nb::arg("num_threads") = 0, nb::arg("out") = 0,
      "Sum of squares of server_err + the average (server_err untouched). Internal: see ds_native.onebit.");
  m.def(
      "onebit_server_pack",
      [](uintptr_t bits, int64_t bits_stride, const std::vector<float>& scales, uintptr_t server_err, int64_t row_len,
         int64_t valid, uintptr_t out, float scale, int threads) {
        if (row_len % 8 != 0 || bits_stride < row_len / 8 || scales.empty())
          throw std::invalid_argument("onebit_server_pack: row_len a multiple of 8, bits_stride >= row_len / 8, W >= 1");
        const uint8_t* bp = ptr<const uint8_t>(bits, "bits");
        float* sp = ptr<float>(server_err, "server_err");
        uint8_t* op = ptr<uint8_t>(out, "out");
        nb::gil_scoped_release release;
        ds::onebit_server_pack(bp, bits_stride, scales, sp, row_len, valid, op, scale, threads);
      },
      nb::arg("bits"), nb::arg("bits_stride"), nb::arg("scales"), nb::arg("server_err"), nb::arg("row_len"),
      nb::arg("valid"), nb::arg("out"), nb::arg("scale"), nb::arg("num_threads") = 0,
      "server_err += the average, packed into out with scale. Internal: see ds_native.onebit.");
  m.def(
      "onebit_sum_squares",
      [](uintptr_t x, int64_t numel, int threads) {
        if (numel < 0) throw std::invalid_argument("onebit_sum_squares: numel must be >= 0");
        if (numel == 0) return 0.0;
        const float* xp = ptr<const float>(x, "x");
        nb::gil_scoped_release release;
        return ds::onebit_sum_squares(xp, numel, threads);
      },
      nb::arg("x"), nb::arg("numel"), nb::arg("num_threads") = 0,
      "Fixed-order sum of squares of an fp32 buffer. Internal: ds_native.onebit is the API.");
  m.def(
      "onebit_compress_deferred",
      [](uintptr_t x, int64_t x_dtype, uintptr_t err, int64_t numel, int64_t rows, int64_t row_len, uintptr_t out,
         int64_t out_stride, const std::vector<float>& prev, const std::vector<int64_t>& valid, int threads) {
        const ds::DType dt = dtype_code(x_dtype);
        if (numel < 0 || rows < 1 || row_len % 8 != 0 || numel > rows * row_len || out_stride < row_len / 8)
          throw std::invalid_argument(
              "onebit_compress_deferred: need 0 <= numel <= rows * row_len, row_len % 8 == 0, out_stride >= row_len / 8");
        if (!prev.empty() && static_cast<int64_t>(prev.size()) != rows)
          throw std::invalid_argument("onebit_compress_deferred: prev must be empty or one scale per row");
        const void* xp = numel > 0 ? ptr<const void>(x, "x") : nullptr;
        float* ep = ptr<float>(err, "err");
        uint8_t* op = ptr<uint8_t>(out, "out");
        const float* pp = prev.empty() ? nullptr : prev.data();
        nb::gil_scoped_release release;
        return ds::onebit_compress_deferred(xp, dt, ep, numel, rows, row_len, op, out_stride, pp, valid, threads);
      },
      nb::arg("x"), nb::arg("x_dtype"), nb::arg("err"), nb::arg("numel"), nb::arg("rows"), nb::arg("row_len"),
      nb::arg("out"), nb::arg("out_stride"), nb::arg("prev"), nb::arg("valid"), nb::arg("num_threads") = 0,
      "Worker side with a deferred error update. Internal: ds_native.onebit is the API.");
  m.def(
      "onebit_server_deferred",
      [](uintptr_t bits, int64_t bits_stride, const std::vector<float>& scales, uintptr_t server_err, int64_t row_len,
         int64_t valid, uintptr_t out, const std::vector<float>& prev, int threads) {
        if (row_len % 8 != 0 || bits_stride < row_len / 8 || scales.empty() || prev.size() > 1)
          throw std::invalid_argument(
              "onebit_server_deferred: row_len a multiple of 8, bits_stride >= row_len / 8, W >= 1, at most one prev");
        const uint8_t* bp = ptr<const uint8_t>(bits, "bits");
        float* sp = ptr<float>(server_err, "server_err");
        uint8_t* op = ptr<uint8_t>(out, "out");
        const float* pp = prev.empty() ? nullptr : prev.data();
        nb::gil_scoped_release release;
        return ds::onebit_server_deferred(bp, bits_stride, scales, sp, row_len, valid, op, pp, threads);
      },
      nb::arg("bits"), nb::arg("bits_stride"), nb::arg("scales"), nb::arg("server_err"), nb::arg("row_len"),
      nb::arg("valid"), nb::arg("out"), nb::arg("prev"), nb::arg("num_threads") = 0,
      "Server side with a deferred error update. Internal: ds_native.onebit is the API.");
  m.def(
      "onebit_settle",
      [](uintptr_t err, int64_t rows, int64_t row_len, const std::vector<float>& scales,
         const std::vector<int64_t>& valid, int threads) {
        if (rows < 1 || row_len % 8 != 0) throw std::invalid_argument("onebit_settle: rows >= 1, row_len % 8 == 0");
        float* ep = ptr<float>(err, "err");
        nb::gil_scoped_release release;
        ds::onebit_settle(ep, rows, row_len, scales, valid, threads);
      },
      nb::arg("err"), nb::arg("rows"), nb::arg("row_len"), nb::arg("scales"), nb::arg("valid"),
      nb::arg("num_threads") = 0, "Apply deferred error updates. Internal: ds_native.onebit is the API.");
  m.def(
      "onebit_decode",
      [](uintptr_t bits, int64_t bits_stride, const std::vector<float>& scales, int64_t row_len, uintptr_t out,
         int64_t numel, int threads) {
        if (row_len % 8 != 0 || bits_stride < row_len / 8 || numel > static_cast<int64_t>(scales.size()) * row_len)
          throw std::invalid_argument("onebit_decode: bad row_len, bits_stride or numel");
        const uint8_t* bp = ptr<const uint8_t>(bits, "bits");
        float* op = ptr<float>(out, "out");
        nb::gil_scoped_release release;
        ds::onebit_decode(bp, bits_stride, scales, row_len, op, numel, threads);
      },
      nb::arg("bits"), nb::arg("bits_stride"), nb::arg("scales"), nb::arg("row_len"), nb::arg("out"),
      nb::arg("numel"), nb::arg("num_threads") = 0,
      "out[:numel] = scale * sign per row. Internal: ds_native.onebit is the API.");
}
