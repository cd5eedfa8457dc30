// The shared core's kernels built for AVX2 + FMA (x86-64), chosen at run time when the CPU has
// them (segment_core.cpp), like ATen's own CPU kernels. The target pragma comes before any
// header that uses it: ATen's vec headers then take their AVX2 implementation.
//
// Caveat shared with every multi-versioned build: inline functions from headers outside the
// CPU_CAPABILITY namespace that the vec headers bring in are emitted here with AVX2 enabled;
// the linker's choice of such a copy for another file would matter only on a CPU without AVX2.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Everything but the vec headers first, so that it keeps the baseline target: template and
// inline functions take the target in force where they are defined.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include "../coefficients.h"
#include "segment_core.h"

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// The pragma enables the instructions but (in GCC) not the feature macros that headers such as
// sleef.h test to declare their AVX functions: set them as -mavx2 -mfma -mf16c would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "segment_kernels.h"

namespace stochnorm_ext::cpu {
const KernelTable* avx2_kernel_table() { return AVX2::make_kernel_table(); }
}  // namespace stochnorm_ext::cpu

#else
#include "segment_core.h"

namespace stochnorm_ext::cpu {
const KernelTable* avx2_kernel_table() { return nullptr; }
}  // namespace stochnorm_ext::cpu
#endif
