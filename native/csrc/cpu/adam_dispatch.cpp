// Host side of CPU Adam: coefficients, slicing, threads, ISA choice.
#include <omp.h>

#include <vector>

#include "cpu/adam.h"
#include "cpu/kernels.h"

namespace ds {
namespace {

// Elements per work item. A multiple of every vector width and of a 64-byte
// cache line in every dtype, so slices never share a line they write. Large
// enough that per-item overhead vanishes, small enough to balance threads
// over a mix of tensor sizes. Slice boundaries do not depend on the thread
// count, and the per-element arithmetic not on the slice: results are bitwise
// the same for any number of threads.
constexpr int64_t kSliceElems = 1 << 15;

// Below this many elements in total, threads cost more than they save.
constexpr int64_t kParallelMin = 1 << 15;

using AdamFn = void (*)(const AdamSlice&);
using StreamFn = void (*)(float*, const float*, float*, float*, int64_t);

AdamFn pick_adam(Isa isa) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512: return &avx512::adam_update;
    case Isa::avx2: return &avx2::adam_update;
#endif
    default: return &scalar::adam_update;
  }
}

StreamFn pick_stream(Isa isa) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512: return &avx512::stream_adam_shape;
    case Isa::avx2: return &avx2::stream_adam_shape;
#endif
    default: return &scalar::stream_adam_shape;
  }
}

int resolve_threads(int num_threads) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

}  // namespace

void adam_step(const std::vector<AdamTensor>& tensors, int num_threads) {
  std::vector<AdamSlice> slices;
  int64_t total = 0;
  for (const AdamTensor& t : tensors) {
    const size_t gb = t.grad_dtype == DType::f32 ? 4 : 2;
    for (int64_t start = 0; start < t.numel; start += kSliceElems) {
      const int64_t n = t.numel - start < kSliceElems ? t.numel - start : kSliceElems;
      slices.push_back({t.param + start, static_cast<const char*>(t.grad) + start * gb, t.exp_avg + start,
                        t.exp_avg_sq + start, t.out == nullptr ? nullptr : static_cast<char*>(t.out) + start * 2, n,
                        t.grad_dtype, t.out_dtype, &t.coeffs});
    }
    total += t.numel;
  }
  const AdamFn fn = pick_adam(active_isa());
  const int64_t count = static_cast<int64_t>(slices.size());
  const int threads = resolve_threads(num_threads);
  // schedule(static): each thread takes one contiguous run of slices, so its
  // seven streams stay sequential for the hardware prefetchers. (Measured:
  // dynamic scheduling, slices interleaved between threads, costs ~15% more
  // CPU time per step.)
#pragma omp parallel for schedule(static) num_threads(threads) if (total >= kParallelMin && threads > 1)
  for (int64_t i = 0; i < count; ++i) fn(slices[i]);
}

void stream_adam_shape(float* a, const float* b, float* c, float* d, int64_t n, int num_threads) {
  const StreamFn fn = pick_stream(active_isa());
  const int64_t count = (n + kSliceElems - 1) / kSliceElems;
  const int threads = resolve_threads(num_threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= kParallelMin && threads > 1)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t start = i * kSliceElems;
    const int64_t len = n - start < kSliceElems ? n - start : kSliceElems;
    fn(a + start, b + start, c + start, d + start, len);
  }
}

}  // namespace ds
