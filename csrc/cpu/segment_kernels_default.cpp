// The shared core's kernels built for any CPU (ATen's portable at::vec implementation, which
// the compiler vectorises for the baseline instruction set).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "segment_kernels.h"

namespace stochnorm_ext::cpu {

const KernelTable* default_kernel_table() { return DEFAULT::make_kernel_table(); }

}  // namespace stochnorm_ext::cpu
