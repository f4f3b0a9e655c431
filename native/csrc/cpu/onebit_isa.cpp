// 1-bit compression kernels on one piece, compiled once per ISA (DS_ISA_NS).
//
// Bitwise contract (see onebit.h): the same IEEE operations per element as the
// torch implementation in onebit_comm.compress. A decoded element is exactly
// +scale or -scale; the error update is one subtraction; the server average
// adds the W decoded rows in rank order. Compiled with -ffp-contract=off so no
// operation is fused into another.
#include <cstring>

#include "cpu/onebit.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef DS_ISA_NS
#error "DS_ISA_NS must name the ISA namespace"
#endif

namespace ds::DS_ISA_NS {
namespace {

// Bit reversal of a byte: vector compares give element i at bit i, the wire
// format has element 0 in the most significant bit.
struct RevTable {
  uint8_t v[256];
  constexpr RevTable() : v() {
    for (int b = 0; b < 256; ++b) {
      int r = 0;
      for (int i = 0; i < 8; ++i) r |= ((b >> i) & 1) << (7 - i);
      v[b] = static_cast<uint8_t>(r);
    }
  }
};
constexpr RevTable kRev{};

inline float load_elem(const void* x, DType dt, int64_t i) {
  switch (dt) {
    case DType::bf16: {
      uint16_t b;
      std::memcpy(&b, static_cast<const uint16_t*>(x) + i, 2);
      const uint32_t wide = static_cast<uint32_t>(b) << 16;
      float f;
      std::memcpy(&f, &wide, 4);
      return f;
    }
    case DType::f16: {
      _Float16 h;
      std::memcpy(&h, static_cast<const uint16_t*>(x) + i, 2);
      return static_cast<float>(h);
    }
    default: return static_cast<const float*>(x)[i];
  }
}

// One packed byte (8 elements) with its error update, scalar.
inline uint8_t pack8_scalar(float* e, float s) {
  uint8_t byte = 0;
  for (int j = 0; j < 8; ++j) {
    const bool pos = e[j] >= 0.0f;
    byte |= static_cast<uint8_t>(pos) << (7 - j);
    e[j] = e[j] - (pos ? s : -s);
  }
  return byte;
}

// Reverses the bit order within each byte of a word: maps the wire format (element 8k + j at
// bit 7 - j of byte k) to element i at bit i of the little-endian word, and back.
inline uint64_t reverse_bits_in_bytes(uint64_t v) {
  v = ((v >> 1) & 0x5555555555555555ull) | ((v & 0x5555555555555555ull) << 1);
  v = ((v >> 2) & 0x3333333333333333ull) | ((v & 0x3333333333333333ull) << 2);
  return ((v >> 4) & 0x0F0F0F0F0F0F0F0Full) | ((v & 0x0F0F0F0F0F0F0F0Full) << 4);
}

#if defined(__AVX512F__)
// 64 values of the server average from sign byte b on: acc[q] holds elements 16q..16q+15, the sum
// over r (in rank order) of +-scales[r] by rank r's bit. The bit order within each byte is reversed
// in registers (three mask-and-shift steps) rather than by a table lookup per byte.
inline void decode_sum64(const uint8_t* const* bits, int64_t b, const float* scales, int64_t w, __m512 acc[4]) {
  for (int64_t r = 0; r < w; ++r) {
    uint64_t word;
    std::memcpy(&word, bits[r] + b, 8);
    word = reverse_bits_in_bytes(word);
    const __m512 vs = _mm512_set1_ps(scales[r]), vns = _mm512_set1_ps(-scales[r]);
    for (int q = 0; q < 4; ++q) {
      const __m512 d = _mm512_mask_blend_ps(static_cast<__mmask16>(word >> (16 * q)), vns, vs);
      acc[q] = r == 0 ? d : _mm512_add_ps(acc[q], d);
    }
  }
}
#endif

inline float sign_at(const uint8_t* bits, int64_t i, float s) {
  return ((bits[i >> 3] >> (7 - (i & 7))) & 1) ? s : -s;
}

// [Note: the fixed-order sum of squares] One block of n <= kSumBlock elements summed in fp32 in
// an order that every ISA reproduces exactly: 64 lanes, lane l adding x[i]^2 for i = l (mod 64)
// in increasing i (a missing element counts as +0, which leaves a lane unchanged), then folded
// pairwise: lane l += lane l + 32, then l + 16, 8, 4, 2, 1. Four 16-wide (or eight 8-wide)
// accumulators give the vector units independent chains; the result is the same bits on the
// scalar, AVX2 and AVX-512 builds (compiled with -ffp-contract=off: no fused multiply-adds).
constexpr int64_t kSumBlock = kOnebitSumBlock;

inline float fold8(const float* t8) {
  float t4[4], t2[2];
  for (int l = 0; l < 4; ++l) t4[l] = t8[l] + t8[l + 4];
  for (int l = 0; l < 2; ++l) t2[l] = t4[l] + t4[l + 2];
  return t2[0] + t2[1];
}

float block_sum_squares(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    const __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
    a0 = _mm512_add_ps(a0, _mm512_mul_ps(v0, v0));
    a1 = _mm512_add_ps(a1, _mm512_mul_ps(v1, v1));
    a2 = _mm512_add_ps(a2, _mm512_mul_ps(v2, v2));
    a3 = _mm512_add_ps(a3, _mm512_mul_ps(v3, v3));
  }
  if (i < n) {  // the last, partial group of 64: masked loads read zeros past the end
    __m512 v[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t lo = i + 16 * k, m = n - lo >= 16 ? 16 : (n - lo > 0 ? n - lo : 0);
      v[k] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1), x + (m ? lo : 0));
    }
    a0 = _mm512_add_ps(a0, _mm512_mul_ps(v[0], v[0]));
    a1 = _mm512_add_ps(a1, _mm512_mul_ps(v[1], v[1]));
    a2 = _mm512_add_ps(a2, _mm512_mul_ps(v[2], v[2]));
    a3 = _mm512_add_ps(a3, _mm512_mul_ps(v[3], v[3]));
  }
  // a0..a3 hold lanes 0-15, 16-31, 32-47, 48-63: (a0 + a2) + (a1 + a3) folds 64 -> 32 -> 16.
  const __m512 t16 = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
  alignas(64) float t[16];
  _mm512_store_ps(t, t16);
  float t8[8];
  for (int l = 0; l < 8; ++l) t8[l] = t[l] + t[l + 8];
  return fold8(t8);
#elif defined(__AVX2__)
  __m256 a[8];
  for (int k = 0; k < 8; ++k) a[k] = _mm256_setzero_ps();  // a[k]: lanes 8k .. 8k + 7
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int k = 0; k < 8; ++k) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * k);
      a[k] = _mm256_add_ps(a[k], _mm256_mul_ps(v, v));
    }
  if (i < n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int k = 0; k < 8; ++k) {
      const int64_t lo = i + 8 * k, m = n - lo >= 8 ? 8 : (n - lo > 0 ? n - lo : 0);
      const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), lane);
      const __m256 v = _mm256_maskload_ps(x + (m ? lo : 0), keep);
      a[k] = _mm256_add_ps(a[k], _mm256_mul_ps(v, v));
    }
  }
  __m256 u[4];
  for (int k = 0; k < 4; ++k) u[k] = _mm256_add_ps(a[k], a[k + 4]);  // 64 -> 32 lanes
  const __m256 t8v = _mm256_add_ps(_mm256_add_ps(u[0], u[2]), _mm256_add_ps(u[1], u[3]));  // -> 16 -> 8
  alignas(32) float t8[8];
  _mm256_store_ps(t8, t8v);
  return fold8(t8);
#else
  float a[64] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int l = 0; l < 64; ++l) a[l] = a[l] + x[i + l] * x[i + l];
  for (int l = 0; i + l < n; ++l) a[l] = a[l] + x[i + l] * x[i + l];
  for (int w = 32; w >= 8; w >>= 1)
    for (int l = 0; l < w; ++l) a[l] = a[l] + a[l + w];
  return fold8(a);
#endif
}

// The server's compensated values for elements [0, n) of a block starting at sign byte b0:
// dst[i] = se[i] + sum over r (in order) of scales[r] * sign(bits[r], b0 * 8 + i) for i < valid,
// dst[i] = se[i] past it (the average is zero on padding). dst may be se.
void server_values(const uint8_t* const* bits, int64_t b0, const float* scales, int64_t w, const float* se,
                   float* dst, int64_t n, int64_t valid) {
  const int64_t lim = valid < 0 ? 0 : (valid < n ? valid : n);
  int64_t i = 0;
#if defined(__AVX512F__)
  // 64 elements (8 sign bytes per rank) at a time: the bit order is reversed within each byte
  // with three mask-and-shift steps instead of a table lookup per byte (this loop, done twice
  // per call, is compute-bound otherwise), leaving element i at bit i of the word.
  for (; i + 64 <= lim; i += 64) {
    const int64_t b = b0 + (i >> 3);
    __m512 acc[4];
    decode_sum64(bits, b, scales, w, acc);
    for (int q = 0; q < 4; ++q)
      _mm512_storeu_ps(dst + i + 16 * q, _mm512_add_ps(_mm512_loadu_ps(se + i + 16 * q), acc[q]));
  }
  for (; i + 16 <= lim; i += 16) {
    const int64_t b = b0 + (i >> 3);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < w; ++r) {
      const __mmask16 m = static_cast<__mmask16>(kRev.v[bits[r][b]] | (kRev.v[bits[r][b + 1]] << 8));
      const __m512 d = _mm512_mask_blend_ps(m, _mm512_set1_ps(-scales[r]), _mm512_set1_ps(scales[r]));
      acc = r == 0 ? d : _mm512_add_ps(acc, d);
    }
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(se + i), acc));
  }
#elif defined(__AVX2__)
  const __m256i sel = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  for (; i + 8 <= lim; i += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t r = 0; r < w; ++r) {
      const __m256i b = _mm256_set1_epi32(bits[r][b0 + (i >> 3)]);
      const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
      const __m256 d = _mm256_blendv_ps(_mm256_set1_ps(-scales[r]), _mm256_set1_ps(scales[r]), hit);
      acc = r == 0 ? d : _mm256_add_ps(acc, d);
    }
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(se + i), acc));
  }
#endif
  for (; i < lim; ++i) {
    const int64_t e = b0 * 8 + i;
    float acc = sign_at(bits[0], e, scales[0]);
    for (int64_t r = 1; r < w; ++r) acc = acc + sign_at(bits[r], e, scales[r]);
    dst[i] = se[i] + acc;
  }
  if (dst != se)
    for (; i < n; ++i) dst[i] = se[i];
}

// The deferred passes' fast path for one whole block of kSumBlock elements, all real and valid:
// settle with *prev (when given), add x (fp32) or the W decoded rows, store, take the signs and the
// block's sum of squares, in registers, 64 elements at a time. The same operations in the same order
// as the composed path (onebit_pack_piece's update, onebit_compensate_piece or server_values,
// block_sum_squares, onebit_signs_piece), so the same bits. AVX-512 only: elsewhere it returns
// false and the caller composes those kernels block by block.
// store == false: e is only read (server_err's read-only first pass); out == nullptr: no signs.
bool block_fast(const float* x, const uint8_t* const* bits, int64_t b0, const float* scales, int64_t w, float* e,
                uint8_t* out, const float* prev, float* sum, bool store) {
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps();
  const __m512 ps = _mm512_set1_ps(prev ? *prev : 0.0f), ns = _mm512_set1_ps(prev ? -*prev : 0.0f);
  __m512 a[4] = {zero, zero, zero, zero};
  for (int64_t i = 0; i < kSumBlock; i += 64) {
    __m512 add[4];
    if (x != nullptr) {
      for (int q = 0; q < 4; ++q) add[q] = _mm512_loadu_ps(x + i + 16 * q);
    } else {
      const int64_t b = b0 + (i >> 3);
      decode_sum64(bits, b, scales, w, add);
    }
    uint64_t signs = 0;
    for (int q = 0; q < 4; ++q) {
      __m512 v = _mm512_loadu_ps(e + i + 16 * q);
      if (prev != nullptr) v = _mm512_sub_ps(v, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ), ns, ps));
      v = _mm512_add_ps(v, add[q]);
      a[q] = _mm512_add_ps(a[q], _mm512_mul_ps(v, v));
      if (store) _mm512_storeu_ps(e + i + 16 * q, v);
      if (out != nullptr) signs |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ)) << (16 * q);
    }
    if (out != nullptr) {
      signs = reverse_bits_in_bytes(signs);
      std::memcpy(out + (i >> 3), &signs, 8);
    }
  }
  const __m512 t16 = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
  alignas(64) float t[16];
  _mm512_store_ps(t, t16);
  float t8[8];
  for (int l = 0; l < 8; ++l) t8[l] = t[l] + t[l + 8];
  *sum = fold8(t8);
  return true;
#else
  (void)x, (void)bits, (void)b0, (void)scales, (void)w, (void)e, (void)out, (void)prev, (void)sum, (void)store;
  return false;
#endif
}

}  // namespace

double onebit_sum_squares_piece(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kSumBlock)
    total += static_cast<double>(block_sum_squares(x + b, n - b < kSumBlock ? n - b : kSumBlock));
  return total;
}

double onebit_compensate_piece(const void* x, DType x_dtype, float* err, int64_t real, int64_t n, uint8_t* out) {
  const int64_t xsize = x_dtype == DType::f32 ? 4 : 2;
  double total = 0.0;
  // Block by block, so the squares are summed while the block just written is in L1.
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t len = n - b < kSumBlock ? n - b : kSumBlock;
    const int64_t add = real - b < len ? (real - b > 0 ? real - b : 0) : len;
    float* e = err + b;
    float sum;
    uint8_t* o = out != nullptr ? out + (b >> 3) : nullptr;
    if (len == kSumBlock && add == len && x_dtype == DType::f32 &&
        block_fast(static_cast<const float*>(x) + b, nullptr, 0, nullptr, 0, e, o, nullptr, &sum, true)) {
      total += static_cast<double>(sum);
      continue;
    }
    if (x_dtype == DType::f32) {
      const float* xf = static_cast<const float*>(x) + b;
#pragma omp simd
      for (int64_t i = 0; i < add; ++i) e[i] = e[i] + xf[i];
    } else {
      const char* xb = static_cast<const char*>(x) + b * xsize;
      for (int64_t i = 0; i < add; ++i) e[i] = e[i] + load_elem(xb, x_dtype, i);
    }
    total += static_cast<double>(block_sum_squares(e, len));
    if (o != nullptr) onebit_signs_piece(e, o, len);
  }
  return total;
}

void onebit_pack_piece(float* err, uint8_t* out, int64_t n, float scale, int64_t valid) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale), vns = _mm512_set1_ps(-scale), zero = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = _mm512_loadu_ps(err + i);
    const __mmask16 m = _mm512_cmp_ps_mask(e, zero, _CMP_GE_OQ);
    out[i >> 3] = kRev.v[m & 0xff];
    out[(i >> 3) + 1] = kRev.v[m >> 8];
    _mm512_storeu_ps(err + i, _mm512_sub_ps(e, _mm512_mask_blend_ps(m, vns, vs)));
  }
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(scale), vns = _mm256_set1_ps(-scale), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = _mm256_loadu_ps(err + i);
    const __m256 ge = _mm256_cmp_ps(e, zero, _CMP_GE_OQ);
    out[i >> 3] = kRev.v[_mm256_movemask_ps(ge)];
    _mm256_storeu_ps(err + i, _mm256_sub_ps(e, _mm256_blendv_ps(vns, vs, ge)));
  }
#endif
  for (; i < n; i += 8) out[i >> 3] = pack8_scalar(err + i, scale);
  // Padding never carries error (onebit_comm.compress, [Note: the padded layout]).
  const int64_t start = valid < 0 ? 0 : valid;
  for (int64_t k = start; k < n; ++k) err[k] = 0.0f;
}

void onebit_server_piece(const uint8_t* const* bits, int64_t b0, const float* scales, int64_t w, float* se, int64_t n,
                         int64_t valid) {
  server_values(bits, b0, scales, w, se, se, n, valid);
}

void onebit_signs_piece(const float* c, uint8_t* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps();
  for (; i + 64 <= n; i += 64) {
    uint64_t signs = 0;
    for (int q = 0; q < 4; ++q)
      signs |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(c + i + 16 * q), zero, _CMP_GE_OQ))
               << (16 * q);
    signs = reverse_bits_in_bytes(signs);
    std::memcpy(out + (i >> 3), &signs, 8);
  }
#elif defined(__AVX2__)
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8)
    out[i >> 3] = kRev.v[_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(c + i), zero, _CMP_GE_OQ))];
#endif
  for (; i < n; i += 8) {
    uint8_t byte = 0;
    for (int j = 0; j < 8; ++j) byte |= static_cast<uint8_t>(c[i + j] >= 0.0f) << (7 - j);
    out[i >> 3] = byte;
  }
}

double onebit_server_sum_squares_piece(const uint8_t* const* bits, const float* scales, int64_t w, const float* se,
                                       int64_t n, int64_t valid, uint8_t* out) {
  // Read-only: the compensated values go to an L1 scratch block, never to server_err.
  alignas(64) float tmp[kSumBlock];
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t len = n - b < kSumBlock ? n - b : kSumBlock;
    float sum;
    uint8_t* o = out != nullptr ? out + (b >> 3) : nullptr;
    if (len == kSumBlock && valid - b >= kSumBlock &&
        block_fast(nullptr, bits, b >> 3, scales, w, const_cast<float*>(se + b), o, nullptr, &sum, false)) {
      total += static_cast<double>(sum);  // the same sum, in registers (se is only read)
      continue;
    }
    server_values(bits, b >> 3, scales, w, se + b, tmp, len, valid - b);
    total += static_cast<double>(block_sum_squares(tmp, len));
    if (o != nullptr) onebit_signs_piece(tmp, o, len);
  }
  return total;
}

void onebit_server_pack_piece(const uint8_t* const* bits, const float* scales, int64_t w, float* se, uint8_t* out,
                              int64_t n, int64_t valid, float scale) {
  // The same values as onebit_server_sum_squares_piece (the same operations on the same inputs),
  // written to server_err and packed while the block is in L1: one write of server_err per call.
  int64_t i = 0;
#if defined(__AVX512F__)
  // Whole groups of 64 real elements in one go: compensated value, sign bit and error update
  // in registers (the same operations as server_values then onebit_pack_piece).
  const int64_t lim = valid < 0 ? 0 : (valid < n ? valid : n);
  const __m512 ps = _mm512_set1_ps(scale), ns = _mm512_set1_ps(-scale), zero = _mm512_setzero_ps();
  for (; i + 64 <= lim; i += 64) {
    const int64_t b = i >> 3;
    __m512 acc[4];
    decode_sum64(bits, b, scales, w, acc);
    uint64_t signs = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512 c = _mm512_add_ps(_mm512_loadu_ps(se + i + 16 * q), acc[q]);
      const __mmask16 m = _mm512_cmp_ps_mask(c, zero, _CMP_GE_OQ);
      signs |= static_cast<uint64_t>(m) << (16 * q);
      _mm512_storeu_ps(se + i + 16 * q, _mm512_sub_ps(c, _mm512_mask_blend_ps(m, ns, ps)));
    }
    signs = reverse_bits_in_bytes(signs);
    std::memcpy(out + b, &signs, 8);
  }
#endif
  // The rest (and every element on other ISAs) block by block while each is in L1.
  for (int64_t b = i; b < n; b += kSumBlock) {
    const int64_t len = n - b < kSumBlock ? n - b : kSumBlock;
    server_values(bits, b >> 3, scales, w, se + b, se + b, len, valid - b);
    onebit_pack_piece(se + b, out + (b >> 3), len, scale, valid - b);
  }
}

void onebit_decode_piece(const uint8_t* bits, float scale, float* out, int64_t n, bool stream) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  // Streaming (non-temporal) stores skip the read-for-ownership of each output line: a large
  // output is written once and not read back soon. They need aligned vectors: the first elements
  // up to the vector boundary go through the scalar loop, and the vector loop needs to start on a
  // whole sign byte (a multiple of 8 elements); otherwise plain stores.
  #if defined(__AVX512F__)
  constexpr uintptr_t kAlign = 64;
#else
  constexpr uintptr_t kAlign = 32;
#endif
  const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
  if (stream && addr % 4 == 0) {
    const int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / 4);
    if (head % 8 != 0 || head > n) {
      stream = false;
    } else {
      for (; i < head; ++i) out[i] = sign_at(bits, i, scale);
    }
  } else {
    stream = false;
  }
#else
  stream = false;
#endif
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale), vns = _mm512_set1_ps(-scale);
  for (; i + 16 <= n; i += 16) {
    const int64_t b = i >> 3;
    const __mmask16 m = static_cast<__mmask16>(kRev.v[bits[b]] | (kRev.v[bits[b + 1]] << 8));
    const __m512 v = _mm512_mask_blend_ps(m, vns, vs);
    if (stream)
      _mm512_stream_ps(out + i, v);
    else
      _mm512_storeu_ps(out + i, v);
  }
#elif defined(__AVX2__)
  // Element j of a byte (MSB first) tested against its own bit.
  const __m256i sel = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  const __m256 vs = _mm256_set1_ps(scale), vns = _mm256_set1_ps(-scale);
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_set1_epi32(bits[i >> 3]);
    const __m256i hit = _mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel);
    const __m256 v = _mm256_blendv_ps(vns, vs, _mm256_castsi256_ps(hit));
    if (stream)
      _mm256_stream_ps(out + i, v);
    else
      _mm256_storeu_ps(out + i, v);
  }
#endif
  for (; i < n; ++i) out[i] = sign_at(bits, i, scale);
#if defined(__AVX512F__) || defined(__AVX2__)
  if (stream) _mm_sfence();  // order the streaming stores before the caller's next access
#endif
}

bool onebit_deferred_block(const float* x, const uint8_t* const* bits, int64_t b0, const float* scales, int64_t w,
                           float* e, uint8_t* out, const float* prev, float* sum) {
  return block_fast(x, bits, b0, scales, w, e, out, prev, sum, true);
}

}  // namespace ds::DS_ISA_NS
