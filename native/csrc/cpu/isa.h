// Runtime instruction-set selection for the CPU kernels.
//
// Every kernel source in this folder is compiled once per ISA into its own
// namespace (see CMakeLists.txt, DS_ISA_NS). The dispatcher asks the CPU what
// it supports on first use, never at build time, so one wheel runs everywhere.
#pragma once
#include <cstdint>
#include <string>

namespace ds {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// Best ISA this CPU supports among those compiled in.
Isa detect_isa();
// ISA kernels run with: DS_NATIVE_ISA env var or set_isa() if set, else detect_isa().
Isa active_isa();
// Force an ISA (for tests and benchmarks). Throws if this CPU or build lacks it.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);
bool isa_supported_by_cpu(Isa isa);

}  // namespace ds
