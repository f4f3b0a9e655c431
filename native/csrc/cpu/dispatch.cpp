#include "cpu/dispatch.h"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cpu/kernels.h"

namespace ds {
namespace {

std::atomic<int> g_forced_isa{-1};

bool compiled_list_contains(const char* name) {
  const std::string list = DS_ISA_LIST;
  const std::string needle = name;
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t comma = list.find(',', pos);
    if (comma == std::string::npos) comma = list.size();
    if (list.compare(pos, comma - pos, needle) == 0) return true;
    pos = comma + 1;
  }
  return false;
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("unknown ISA '" + name + "'; expected one of: scalar, avx2, avx512");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

bool isa_compiled(Isa isa) { return compiled_list_contains(isa_name(isa)); }

bool isa_supported_by_cpu(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
#else
  return isa == Isa::scalar;
#endif
}

Isa detect_isa() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (isa_compiled(isa) && isa_supported_by_cpu(isa)) return isa;
  }
  return Isa::scalar;
}

void set_isa(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_forced_isa.store(-1);
    return;
  }
  const Isa isa = parse_isa(name);
  if (!isa_compiled(isa)) throw std::invalid_argument("ISA '" + name + "' was not compiled into ds-native");
  if (!isa_supported_by_cpu(isa)) throw std::invalid_argument("this CPU does not support ISA '" + name + "'");
  g_forced_isa.store(static_cast<int>(isa));
}

Isa active_isa() {
  const int forced = g_forced_isa.load();
  if (forced >= 0) return static_cast<Isa>(forced);
  static const Isa from_env_or_cpu = [] {
    const char* env = std::getenv("DS_NATIVE_ISA");
    if (env != nullptr && *env != '\0' && std::string(env) != "auto") {
      const Isa isa = parse_isa(env);
      if (!isa_compiled(isa) || !isa_supported_by_cpu(isa)) {
        throw std::invalid_argument(std::string("DS_NATIVE_ISA=") + env +
                                    " is not available on this CPU/build");
      }
      return isa;
    }
    return detect_isa();
  }();
  return from_env_or_cpu;
}

namespace {

using SumSquaresFn = double (*)(const void*, int64_t);

template <typename T>
SumSquaresFn erase(double (*fn)(const T*, int64_t)) {
  return reinterpret_cast<SumSquaresFn>(fn);
}

SumSquaresFn pick_sum_squares(DType dtype, Isa isa) {
#define DS_PICK(ns)                                           \
  switch (dtype) {                                            \
    case DType::f32: return erase(&ns::sum_squares_f32);      \
    case DType::bf16: return erase(&ns::sum_squares_bf16);    \
    case DType::f16: return erase(&ns::sum_squares_f16);      \
  }
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512: DS_PICK(avx512) break;
    case Isa::avx2: DS_PICK(avx2) break;
#endif
    default: DS_PICK(scalar) break;
  }
#undef DS_PICK
  throw std::logic_error("unreachable dtype");
}

// Chunk size for spreading many tensors over threads: large enough that the
// per-chunk overhead vanishes, small enough that two threads share the work.
constexpr int64_t kChunk = 1 << 16;

}  // namespace

double multi_tensor_sum_squares(const std::vector<TensorView>& tensors, int num_threads) {
  struct Chunk {
    const char* ptr;
    int64_t n;
    SumSquaresFn fn;
  };
  const Isa isa = active_isa();
  std::vector<Chunk> chunks;
  for (const TensorView& t : tensors) {
    const SumSquaresFn fn = pick_sum_squares(t.dtype, isa);
    const int64_t elem = t.dtype == DType::f32 ? 4 : 2;
    for (int64_t start = 0; start < t.numel; start += kChunk) {
      const int64_t n = t.numel - start < kChunk ? t.numel - start : kChunk;
      chunks.push_back({static_cast<const char*>(t.data) + start * elem, n, fn});
    }
  }
  // Per-chunk partials summed in a fixed order: the result is bitwise the
  // same for any thread count.
  std::vector<double> partial(chunks.size(), 0.0);
  const int64_t count = static_cast<int64_t>(chunks.size());
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (count > 1)
  for (int64_t i = 0; i < count; ++i) partial[i] = chunks[i].fn(chunks[i].ptr, chunks[i].n);
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace ds
