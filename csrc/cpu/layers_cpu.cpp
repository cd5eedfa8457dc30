// The CPU kernels of every stochnorm_ext device op: the layers and core ops of csrc/layers.h
// over the CPU core (segment_core.h), the coefficient steps of csrc/coefficients.h run as a
// loop over their index.
#include <torch/library.h>

#include "../layers.h"
#include "segment_core.h"

namespace stochnorm_ext::cpu {
namespace {

struct CpuDevice {
  // The dispatcher picks the CPU kernels only when every tensor argument is on the CPU.
  struct Guard {};
  static Guard enter(const at::Tensor&, const char*) { return {}; }

  static constexpr auto segment_stats = &cpu::segment_stats;
  static constexpr auto segment_apply = &cpu::segment_apply;
  static constexpr auto segment_grad_sums = &cpu::segment_grad_sums;
  static constexpr auto segment_grad_apply = &cpu::segment_grad_apply;

  template <typename Step, typename Args>
  static void for_each_index(int64_t n, const Args& args) {
    for (int64_t i = 0; i < n; ++i) Step()(i, args);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, CPU, m) {
  layers::register_kernels<CpuDevice>(m);
}

}  // namespace stochnorm_ext::cpu
