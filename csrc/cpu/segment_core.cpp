// Tensor level of the shared CPU core: dtype dispatch and the choice of the kernel build for
// this CPU (layout and allocation helpers: csrc/common.h, shared with the CUDA backend).
#include "segment_core.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Version.h>

#include <string>

namespace stochnorm_ext::cpu {

const KernelTable& kernel_table() {
  static const KernelTable* table = [] {
    // ATen's own choice (it honours ATEN_CPU_CAPABILITY), and the CPU's word for the extras.
    const std::string aten = at::get_cpu_capability();
    bool avx2 = aten == "AVX2" || aten == "AVX512";
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    avx2 = avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    // Only touch the AVX2 build (even its static table) on a CPU that has AVX2.
    const KernelTable* chosen = avx2 ? avx2_kernel_table() : nullptr;
    return chosen != nullptr ? chosen : default_kernel_table();
  }();
  return *table;
}

using common::table_arg;
using common::table_options;

#define STOCHNORM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> segment_stats(const SegmentInput& in) {
  at::Tensor mean = new_output({in.channels, in.pieces}, common::stats_table_options(in));
  at::Tensor m2 = new_output({in.channels, in.pieces}, common::stats_table_options(in));
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_stats", [&] {
    kernel_table().get<scalar_t>().stats(in.geometry, in.x.const_data_ptr<scalar_t>(), mean.data_ptr<double>(),
                                         m2.data_ptr<double>());
  });
  return {mean, m2};
}

at::Tensor segment_apply(const SegmentInput& in, const at::Tensor& center, const at::Tensor& scale,
                         const at::Tensor& shift) {
  const at::Tensor c = table_arg(center, in, "center"), a = table_arg(scale, in, "scale"),
                   b = table_arg(shift, in, "shift");
  at::Tensor y = new_output(in.x.sizes(), in.x.options(), in.format);
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kernel_table().get<scalar_t>().apply(in.geometry, in.x.const_data_ptr<scalar_t>(), c.const_data_ptr<acc_t>(),
                                         a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                         y.data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> segment_grad_sums(const at::Tensor& grad_output, const SegmentInput& in,
                                                     const at::Tensor& center) {
  const at::Tensor dy = same_layout(grad_output, in);
  const at::Tensor c = table_arg(center, in, "center");
  at::Tensor sum_dy = new_output({in.channels, in.pieces}, table_options(in));
  at::Tensor sum_dy_xc = new_output({in.channels, in.pieces}, table_options(in));
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_grad_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kernel_table().get<scalar_t>().grad_sums(in.geometry, dy.const_data_ptr<scalar_t>(),
                                             in.x.const_data_ptr<scalar_t>(), c.const_data_ptr<acc_t>(),
                                             sum_dy.data_ptr<acc_t>(), sum_dy_xc.data_ptr<acc_t>());
  });
  return {sum_dy, sum_dy_xc};
}

at::Tensor segment_grad_apply(const at::Tensor& grad_output, const SegmentInput& in, const at::Tensor& center,
                              const at::Tensor& k_dy, const at::Tensor& k_x, const at::Tensor& k_0) {
  const at::Tensor dy = same_layout(grad_output, in);
  const at::Tensor c = table_arg(center, in, "center"), a = table_arg(k_dy, in, "k_dy"),
                   b = table_arg(k_x, in, "k_x"), z = table_arg(k_0, in, "k_0");
  at::Tensor dx = new_output(in.x.sizes(), in.x.options(), in.format);
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_grad_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kernel_table().get<scalar_t>().grad_apply(in.geometry, dy.const_data_ptr<scalar_t>(),
                                              in.x.const_data_ptr<scalar_t>(), c.const_data_ptr<acc_t>(),
                                              a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                              z.const_data_ptr<acc_t>(), dx.data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace stochnorm_ext::cpu
