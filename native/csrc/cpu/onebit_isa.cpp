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

inline float sign_at(const uint8_t* bits, int64_t i, float s) {
  return ((bits[i >> 3] >> (7 - (i & 7))) & 1) ? s : -s;
}

}  // namespace

void onebit_add_piece(const void* x, DType x_dtype, float* err, int64_t n) {
  if (x_dtype == DType::f32) {
    const float* xf = static_cast<const float*>(x);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) err[i] = err[i] + xf[i];
    return;
  }
  for (int64_t i = 0; i < n; ++i) err[i] = err[i] + load_elem(x, x_dtype, i);
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

void onebit_server_piece(const uint8_t* const* bits, const float* scales, int64_t w, float* se, int64_t n,
                         int64_t valid) {
  const int64_t lim = valid < 0 ? 0 : (valid < n ? valid : n);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= lim; i += 16) {
    const int64_t b = i >> 3;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < w; ++r) {
      const __mmask16 m = static_cast<__mmask16>(kRev.v[bits[r][b]] | (kRev.v[bits[r][b + 1]] << 8));
      const __m512 d = _mm512_mask_blend_ps(m, _mm512_set1_ps(-scales[r]), _mm512_set1_ps(scales[r]));
      acc = r == 0 ? d : _mm512_add_ps(acc, d);
    }
    _mm512_storeu_ps(se + i, _mm512_add_ps(_mm512_loadu_ps(se + i), acc));
  }
#elif defined(__AVX2__)
  const __m256i sel = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  for (; i + 8 <= lim; i += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t r = 0; r < w; ++r) {
      const __m256i b = _mm256_set1_epi32(bits[r][i >> 3]);
      const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
      const __m256 d = _mm256_blendv_ps(_mm256_set1_ps(-scales[r]), _mm256_set1_ps(scales[r]), hit);
      acc = r == 0 ? d : _mm256_add_ps(acc, d);
    }
    _mm256_storeu_ps(se + i, _mm256_add_ps(_mm256_loadu_ps(se + i), acc));
  }
#endif
  for (; i < lim; ++i) {
    float acc = sign_at(bits[0], i, scales[0]);
    for (int64_t r = 1; r < w; ++r) acc = acc + sign_at(bits[r], i, scales[r]);
    se[i] = se[i] + acc;
  }
  // Padded positions: the average there is forced to zero, so se is unchanged (se + 0).
}

void onebit_decode_piece(const uint8_t* bits, float scale, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale), vns = _mm512_set1_ps(-scale);
  for (; i + 16 <= n; i += 16) {
    const int64_t b = i >> 3;
    const __mmask16 m = static_cast<__mmask16>(kRev.v[bits[b]] | (kRev.v[bits[b + 1]] << 8));
    _mm512_storeu_ps(out + i, _mm512_mask_blend_ps(m, vns, vs));
  }
#elif defined(__AVX2__)
  // Element j of a byte (MSB first) tested against its own bit.
  const __m256i sel = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  const __m256 vs = _mm256_set1_ps(scale), vns = _mm256_set1_ps(-scale);
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_set1_epi32(bits[i >> 3]);
    const __m256i hit = _mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel);
    _mm256_storeu_ps(out + i, _mm256_blendv_ps(vns, vs, _mm256_castsi256_ps(hit)));
  }
#endif
  for (; i < n; ++i) out[i] = sign_at(bits, i, scale);
}

}  // namespace ds::DS_ISA_NS
