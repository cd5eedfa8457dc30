// Registers the CPU kernels of every stochnorm_ext device op: CpuDevice describes the CPU to
// the op implementations of csrc/ops_impl.h (written once for every device): the four passes
// of the CPU core (segment_core.h), the coefficient steps of csrc/coefficients.h run as loops.
// Nothing else lives here: the math is in ops_impl.h, coefficients.h and the core.
#include <torch/library.h>

#include "../ops_impl.h"
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

  // A unit step (coefficients.h): the members' partials combined in member order, then finish.
  template <typename Step, typename Args>
  static void for_each_unit(int64_t units, int64_t members, const Args& args) {
    const Step step;
    for (int64_t u = 0; u < units; ++u) {
      typename Step::Partial total{};
      for (int64_t m = 0; m < members; ++m) total = Step::Partial::combine(total, step.partial(u, m, args));
      for (int64_t m = 0; m < members; ++m) step.finish(u, m, total, args);
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, CPU, m) {
  ops_impl::register_kernels<CpuDevice>(m);
}

}  // namespace stochnorm_ext::cpu
