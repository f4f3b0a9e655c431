// Host side of the 1-bit kernels: pieces, threads, ISA choice (see onebit.h).
#include <omp.h>

#include <stdexcept>
#include <vector>

#include "cpu/onebit.h"

namespace ds {
namespace {

// The unit of work of a thread, and of a sum of squares' partials (a piece's partial
// is summed on its own, partials added in order: the result is independent of the
// thread count). A multiple of the 1 Ki sum block and of 16 elements, so blocks and
// vector loops never straddle pieces.
constexpr int64_t kPiece = 1 << 16;

// Decoded outputs at least this large are written with streaming stores: they are
// bigger than this machine class's caches (an EPYC's L3 slice is 32 MiB), so the
// read-for-ownership that a plain store costs per line buys nothing. Smaller ones stay
// in cache for the caller, which reads them next.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

struct Kernels {
  double (*sumsq)(const float*, int64_t);
  double (*compensate)(const void*, DType, float*, int64_t, int64_t, uint8_t*);
  void (*pack)(float*, uint8_t*, int64_t, float, int64_t);
  void (*server)(const uint8_t* const*, int64_t, const float*, int64_t, float*, int64_t, int64_t);
  double (*server_sumsq)(const uint8_t* const*, const float*, int64_t, const float*, int64_t, int64_t, uint8_t*);
  void (*server_pack)(const uint8_t* const*, const float*, int64_t, float*, uint8_t*, int64_t, int64_t, float);
  void (*decode)(const uint8_t*, float, float*, int64_t, bool);
  void (*signs)(const float*, uint8_t*, int64_t);
  bool (*deferred_block)(const float*, const uint8_t* const*, int64_t, const float*, int64_t, float*, uint8_t*,
                         const float*, float*);
};

Kernels pick() {
#define DS_ONEBIT(ns)                                                                                  \
  Kernels {                                                                                            \
    &ns::onebit_sum_squares_piece, &ns::onebit_compensate_piece, &ns::onebit_pack_piece,               \
        &ns::onebit_server_piece, &ns::onebit_server_sum_squares_piece, &ns::onebit_server_pack_piece, \
        &ns::onebit_decode_piece, &ns::onebit_signs_piece, &ns::onebit_deferred_block                  \
  }
  switch (active_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512: return DS_ONEBIT(avx512);
    case Isa::avx2: return DS_ONEBIT(avx2);
#endif
    default: return DS_ONEBIT(scalar);
  }
#undef DS_ONEBIT
}

int threads_for(int num_threads, int64_t items) {
  const int t = num_threads > 0 ? num_threads : omp_get_max_threads();
  return items > 1 ? t : 1;
}

int64_t pieces_in(int64_t n) { return (n + kPiece - 1) / kPiece; }

// Runs fn(p, row, offset in row, length) for every kPiece-element piece of `rows` rows of
// `row_len`, spread over threads; p numbers the pieces row by row (for per-piece partials).
template <typename Fn>
void for_each_piece(int64_t rows, int64_t row_len, int num_threads, Fn fn) {
  const int64_t per_row = pieces_in(row_len);
  const int64_t count = rows * per_row;
  const int threads = threads_for(num_threads, count);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t p = 0; p < count; ++p) {
    const int64_t off = (p % per_row) * kPiece;
    fn(p, p / per_row, off, off + kPiece < row_len ? kPiece : row_len - off);
  }
}

}  // namespace

std::vector<double> onebit_compensate(const void* x, DType x_dtype, float* err, int64_t numel, int64_t rows,
                                      int64_t row_len, uint8_t* out, int64_t out_stride, int num_threads) {
  const Kernels k = pick();
  const int64_t per_row = pieces_in(row_len);
  const int64_t xsize = x_dtype == DType::f32 ? 4 : 2;
  std::vector<double> partial(static_cast<size_t>(rows * per_row), 0.0);
  for_each_piece(rows, row_len, num_threads, [&](int64_t p, int64_t j, int64_t off, int64_t n) {
    const int64_t start = j * row_len + off;
    const int64_t real = numel - start < n ? numel - start : n;  // elements of x in this piece
    // Squares summed block by block as each is written: no second trip to memory.
    const void* xp = real > 0 ? static_cast<const char*>(x) + start * xsize : x;
    uint8_t* o = out != nullptr ? out + j * out_stride + off / 8 : nullptr;
    partial[p] = k.compensate(xp, x_dtype, err + start, real > 0 ? real : 0, n, o);
  });
  std::vector<double> sums(static_cast<size_t>(rows), 0.0);
  for (size_t p = 0; p < partial.size(); ++p) sums[p / per_row] += partial[p];
  return sums;
}

double onebit_sum_squares(const float* x, int64_t n, int num_threads) {
  const Kernels k = pick();
  std::vector<double> partial(static_cast<size_t>(pieces_in(n)), 0.0);
  for_each_piece(1, n, num_threads, [&](int64_t p, int64_t, int64_t off, int64_t len) {
    partial[p] = k.sumsq(x + off, len);
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void onebit_pack(float* err, int64_t rows, int64_t row_len, uint8_t* out, int64_t out_stride,
                 const std::vector<float>& scales, const std::vector<int64_t>& valid, int num_threads) {
  if (static_cast<int64_t>(scales.size()) != rows || static_cast<int64_t>(valid.size()) != rows)
    throw std::invalid_argument("onebit_pack: one scale and one valid count per row");
  const Kernels k = pick();
  for_each_piece(rows, row_len, num_threads, [&](int64_t, int64_t j, int64_t off, int64_t n) {
    k.pack(err + j * row_len + off, out + j * out_stride + off / 8, n, scales[j], valid[j] - off);
  });
}

namespace {

// Row r of the W received messages, from this piece's first sign byte.
std::vector<const uint8_t*> rows_at(const uint8_t* bits, int64_t bits_stride, int64_t w, int64_t off) {
  std::vector<const uint8_t*> rows(static_cast<size_t>(w));
  for (int64_t r = 0; r < w; ++r) rows[r] = bits + r * bits_stride + off / 8;
  return rows;
}

}  // namespace

double onebit_server(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales, float* server_err,
                     int64_t row_len, int64_t valid, int num_threads) {
  const Kernels k = pick();
  const int64_t w = static_cast<int64_t>(scales.size());
  std::vector<double> partial(static_cast<size_t>(pieces_in(row_len)), 0.0);
  for_each_piece(1, row_len, num_threads, [&](int64_t p, int64_t, int64_t off, int64_t n) {
    const std::vector<const uint8_t*> rows = rows_at(bits, bits_stride, w, off);
    k.server(rows.data(), 0, scales.data(), w, server_err + off, n, valid - off);
    partial[p] = k.sumsq(server_err + off, n);
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

double onebit_server_sum_squares(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales,
                                 const float* server_err, int64_t row_len, int64_t valid, uint8_t* out,
                                 int num_threads) {
  const Kernels k = pick();
  const int64_t w = static_cast<int64_t>(scales.size());
  std::vector<double> partial(static_cast<size_t>(pieces_in(row_len)), 0.0);
  for_each_piece(1, row_len, num_threads, [&](int64_t p, int64_t, int64_t off, int64_t n) {
    const std::vector<const uint8_t*> rows = rows_at(bits, bits_stride, w, off);
    partial[p] = k.server_sumsq(rows.data(), scales.data(), w, server_err + off, n, valid - off,
                                out != nullptr ? out + off / 8 : nullptr);
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void onebit_server_pack(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales, float* server_err,
                        int64_t row_len, int64_t valid, uint8_t* out, float scale, int num_threads) {
  const Kernels k = pick();
  const int64_t w = static_cast<int64_t>(scales.size());
  for_each_piece(1, row_len, num_threads, [&](int64_t, int64_t, int64_t off, int64_t n) {
    const std::vector<const uint8_t*> rows = rows_at(bits, bits_stride, w, off);
    k.server_pack(rows.data(), scales.data(), w, server_err + off, out + off / 8, n, valid - off, scale);
  });
}

// ---- deferred error updates (see onebit.h) ------------------------------------------------------
// Every pass below goes block by block (the sum of squares' 1 Ki blocks): a block is settled,
// compensated, summed and its signs taken while it sits in L1, so each buffer crosses the memory
// bus once per call. Settling is onebit_pack_piece's error update (its sign bytes go to a scratch),
// so the values are the very ones the exact functions leave.

namespace {

constexpr int64_t kBlock = kOnebitSumBlock;

inline int64_t clamp(int64_t v, int64_t hi) { return v < 0 ? 0 : (v < hi ? v : hi); }

}  // namespace

std::vector<double> onebit_compress_deferred(const void* x, DType x_dtype, float* err, int64_t numel, int64_t rows,
                                             int64_t row_len, uint8_t* out, int64_t out_stride, const float* prev,
                                             const std::vector<int64_t>& valid, int num_threads) {
  if (static_cast<int64_t>(valid.size()) != rows)
    throw std::invalid_argument("onebit_compress_deferred: one valid count per row");
  const Kernels k = pick();
  const int64_t per_row = pieces_in(row_len);
  const int64_t xsize = x_dtype == DType::f32 ? 4 : 2;
  std::vector<double> partial(static_cast<size_t>(rows * per_row), 0.0);
  for_each_piece(rows, row_len, num_threads, [&](int64_t p, int64_t j, int64_t off, int64_t n) {
    uint8_t junk[kBlock / 8];
    const int64_t start = j * row_len + off;
    const int64_t real = clamp(numel - start, n);  // elements of x in this piece
    double total = 0.0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = n - b < kBlock ? n - b : kBlock;
      float* e = err + start + b;
      uint8_t* o = out + j * out_stride + (off + b) / 8;
      float sum;
      // A whole block of real fp32 elements: the one-loop fast path where the ISA has one.
      if (len == kBlock && real - b >= kBlock && x_dtype == DType::f32 &&
          k.deferred_block(static_cast<const float*>(x) + start + b, nullptr, 0, nullptr, 0, e, o,
                           prev != nullptr ? prev + j : nullptr, &sum)) {
        total += static_cast<double>(sum);
        continue;
      }
      if (prev != nullptr) k.pack(e, junk, len, prev[j], valid[j] - off - b);
      const int64_t add = clamp(real - b, len);
      const void* xp = add > 0 ? static_cast<const char*>(x) + (start + b) * xsize : x;
      total += k.compensate(xp, x_dtype, e, add, len, o);  // one block: exactly its block sum
    }
    partial[p] = total;
  });
  std::vector<double> sums(static_cast<size_t>(rows), 0.0);
  for (size_t p = 0; p < partial.size(); ++p) sums[p / per_row] += partial[p];
  return sums;
}

double onebit_server_deferred(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales,
                              float* server_err, int64_t row_len, int64_t valid, uint8_t* out, const float* prev,
                              int num_threads) {
  const Kernels k = pick();
  const int64_t w = static_cast<int64_t>(scales.size());
  std::vector<double> partial(static_cast<size_t>(pieces_in(row_len)), 0.0);
  for_each_piece(1, row_len, num_threads, [&](int64_t p, int64_t, int64_t off, int64_t n) {
    uint8_t junk[kBlock / 8];
    const std::vector<const uint8_t*> rows = rows_at(bits, bits_stride, w, off);
    double total = 0.0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = n - b < kBlock ? n - b : kBlock;
      float* e = server_err + off + b;
      float sum;
      if (len == kBlock && valid - off - b >= kBlock &&
          k.deferred_block(nullptr, rows.data(), b / 8, scales.data(), w, e, out + (off + b) / 8, prev, &sum)) {
        total += static_cast<double>(sum);
        continue;
      }
      if (prev != nullptr) k.pack(e, junk, len, *prev, valid - off - b);
      k.server(rows.data(), b / 8, scales.data(), w, e, len, valid - off - b);
      total += k.sumsq(e, len);
      k.signs(e, out + (off + b) / 8, len);
    }
    partial[p] = total;
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void onebit_settle(float* err, int64_t rows, int64_t row_len, const std::vector<float>& scales,
                   const std::vector<int64_t>& valid, int num_threads) {
  if (static_cast<int64_t>(scales.size()) != rows || static_cast<int64_t>(valid.size()) != rows)
    throw std::invalid_argument("onebit_settle: one scale and one valid count per row");
  const Kernels k = pick();
  for_each_piece(rows, row_len, num_threads, [&](int64_t, int64_t j, int64_t off, int64_t n) {
    uint8_t junk[kBlock / 8];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = n - b < kBlock ? n - b : kBlock;
      k.pack(err + j * row_len + off + b, junk, len, scales[j], valid[j] - off - b);
    }
  });
}

void onebit_decode(const uint8_t* bits, int64_t bits_stride, const std::vector<float>& scales, int64_t row_len,
                   float* out, int64_t numel, int num_threads) {
  const Kernels k = pick();
  const int64_t rows = static_cast<int64_t>(scales.size());
  const bool stream = numel * 4 >= kStreamBytes;
  for_each_piece(rows, row_len, num_threads, [&](int64_t, int64_t j, int64_t off, int64_t n) {
    const int64_t start = j * row_len + off;
    if (start + n > numel) n = numel - start;  // the tensor ends inside the last chunk
    if (n > 0) k.decode(bits + j * bits_stride + off / 8, scales[j], out + start, n, stream);
  });
}

}  // namespace ds
