// 1-bit compression kernels for onebit-comm's compressed all-reduce (host side
// in onebit_dispatch.cpp, per-ISA bodies in onebit_isa.cpp).
//
// Layout (onebit_comm.compress, [Note: the padded layout]): a padded flat fp32
// buffer of `rows` rows of `row_len` elements (a multiple of 8); signs packed 8
// per byte, most significant bit first, bit 1 for x >= 0; one scale per row.
// Every function does element-wise the same IEEE operations, in the same order,
// as the torch implementation in onebit_comm.compress, so results are bitwise
// equal to it. Sums of squares are onebit_sum_squares' (onebit_isa.cpp, [Note: the
// fixed-order sum of squares]): fp32 squares summed in a fixed order inside 1 Ki
// blocks, block sums added in double over 64 Ki pieces from the row start, piece
// partials added in order; the same bits for any thread count and on every ISA.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/dispatch.h"

namespace ds {

// The 1 Ki-element blocks of the fixed-order sum of squares; passes that work block
// by block (the deferred ones) use the same boundaries so their sums are the same.
constexpr int64_t kOnebitSumBlock = 1 << 10;

// err[i] += x[i] for i < numel (x of dtype x_dtype, converted exactly to fp32);
// returns, per row of err viewed as [rows, row_len], the sum of squares. With out,
// also each row's signs into out row j (signs do not need the scale: the caller can
// send them before the error update, onebit_settle).
std::vector<double> onebit_compensate(const void* x, DType x_dtype, float* err, int64_t numel, int64_t rows,
                                      int64_t row_len, uint8_t* out, int64_t out_stride, int num_threads);

// The sum of squares of x[0, n) (one row).
double onebit_sum_squares(const float* x, int64_t n, int num_threads);

// Per row j: out[j * out_stride + k] = packed signs of err row j; then
// err row j -= scales[j] * sign, and err row j [valid[j]:] = 0.
void onebit_pack(float* err, int64_t rows, int64_t row_len, uint8_t* out, int64_t out_stride,
                 const std::vector<float>& scales, const std::vector<int64_t>& valid, int num_threads);

// Server side of one chunk: avg = sum over r (in order) of scales[r] * sign(bits row r),
// avg[valid:] = 0, server_err += avg. Returns the sum of squares of server_err.
double onebit_server(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales, float* server_err,
                     int64_t row_len, int64_t valid, int num_threads);

// Server side in two passes, writing server_err once. Pass 1 (read-only): the sum of
// squares of c = server_err + avg (avg as in onebit_server). Pass 2, given the scale
// computed from it: server_err := c, packed into out (1 row) as onebit_pack does.
// (With out, pass 1 also writes the signs, which do not need the scale.)
double onebit_server_sum_squares(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales,
                                 const float* server_err, int64_t row_len, int64_t valid, uint8_t* out,
                                 int num_threads);
void onebit_server_pack(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales, float* server_err,
                        int64_t row_len, int64_t valid, uint8_t* out, float scale, int num_threads);

// Deferred error updates (onebit_comm's PendingErrors): the buffers hold the
// compensated values c of the last call and the scales that turn them into the
// errors (c - scale * sign(c), zero past valid), applied by the next call in the
// same pass that reads the buffer. prev == nullptr: the buffer holds the errors.
// compress_deferred: per row j, err := settled(err) + x, signs of it into out row j;
// returns each row's sum of squares. server_deferred: server_err := settled + avg,
// its signs into out (1 row); returns the sum of squares. settle: err := settled(err).
// Each leaves the buffers, sums and signs bitwise what the exact functions give.
std::vector<double> onebit_compress_deferred(const void* x, DType x_dtype, float* err, int64_t numel, int64_t rows,
                                             int64_t row_len, uint8_t* out, int64_t out_stride, const float* prev,
                                             const std::vector<int64_t>& valid, int num_threads);
double onebit_server_deferred(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales,
                              float* server_err, int64_t row_len, int64_t valid, uint8_t* out, const float* prev,
                              int num_threads);
void onebit_settle(float* err, int64_t rows, int64_t row_len, const std::vector<float>& scales,
                   const std::vector<int64_t>& valid, int num_threads);

// out[j * row_len + i] = scales[j] * sign(bits row j, element i), for flat indices < numel.
void onebit_decode(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales, int64_t row_len,
                   float* out, int64_t numel, int num_threads);

}  // namespace ds

// Per-ISA bodies on one piece (onebit_isa.cpp); n is a multiple of 8 except in
// decode_piece and the sums of squares. compensate_piece adds x to err[0, real) and
// returns the sum of squares of err[0, n); decode_piece with stream uses streaming
// stores where the alignment allows.
#define DS_DECLARE_ONEBIT_KERNELS(ns)                                                                      \
  namespace ds::ns {                                                                                       \
  double onebit_sum_squares_piece(const float* x, int64_t n);                                              \
  double onebit_compensate_piece(const void* x, ds::DType x_dtype, float* err, int64_t real, int64_t n,   \
                                 uint8_t* out);                                                            \
  void onebit_pack_piece(float* err, uint8_t* out, int64_t n, float scale, int64_t valid);                \
  void onebit_server_piece(const uint8_t* const* bits, int64_t b0, const float* scales, int64_t w,        \
                           float* se, int64_t n, int64_t valid);                                           \
  void onebit_signs_piece(const float* c, uint8_t* out, int64_t n);                                        \
  double onebit_server_sum_squares_piece(const uint8_t* const* bits, const float* scales, int64_t w,       \
                                         const float* se, int64_t n, int64_t valid, uint8_t* out);         \
  void onebit_server_pack_piece(const uint8_t* const* bits, const float* scales, int64_t w, float* se,     \
                                uint8_t* out, int64_t n, int64_t valid, float scale);                      \
  void onebit_decode_piece(const uint8_t* bits, float scale, float* out, int64_t n, bool stream);         \
  bool onebit_deferred_block(const float* x, const uint8_t* const* bits, int64_t b0, const float* scales,  \
                             int64_t w, float* e, uint8_t* out, const float* prev, float* sum);            \
  }

DS_DECLARE_ONEBIT_KERNELS(scalar)
DS_DECLARE_ONEBIT_KERNELS(avx2)
DS_DECLARE_ONEBIT_KERNELS(avx512)
