// Tensor level of the shared CPU core: dtype dispatch and the choice of the kernel build for
// this CPU (layout and allocation helpers: csrc/common.h, shared with the CUDA backend).
#include "segment_core.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Version.h>

#include <string>
#include <vector>

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

using common::table_options;

#define STOCHNORM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// The kernels read one table entry per segment: the per-statistic forms of coefficients.h
// spread over the segments first (C * P values: a loop, no allocation through ATen). The
// centres: the table itself when each statistic is one segment, else spread into `spread`.
template <typename T>
const T* segment_centers(const at::Tensor& center, int64_t segments_per_stat, int64_t segments,
                         std::vector<T>& spread) {
  if (segments_per_stat == 1) return center.const_data_ptr<T>();
  const coefficients::CenterTable<T> table{center.const_data_ptr<T>(), segments_per_stat};
  spread.resize(segments);
  for (int64_t s = 0; s < segments; ++s) spread[s] = table[s];
  return spread.data();
}

std::tuple<at::Tensor, at::Tensor> segment_stats(const SegmentInput& in, const at::Tensor& step_count) {
  at::Tensor mean = new_output({in.channels, in.pieces}, common::stats_table_options(in));
  at::Tensor m2 = new_output({in.channels, in.pieces}, common::stats_table_options(in));
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_stats", [&] {
    kernel_table().get<scalar_t>().stats(in.geometry, in.x.const_data_ptr<scalar_t>(), mean.data_ptr<double>(),
                                         m2.data_ptr<double>());
  });
  if (step_count.defined()) *step_count.data_ptr<int64_t>() += 1;  // a host write: no ATen dispatch
  return {mean, m2};
}

at::Tensor segment_apply(const SegmentInput& in, const common::ApplyArgs& args) {
  at::Tensor y = new_output(in.x.sizes(), in.x.options(), in.format);
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const coefficients::ApplyTables<acc_t> tables = args.tables<acc_t>();
    const int64_t segments = in.channels * in.pieces;
    std::vector<acc_t> center(segments), scale(segments), shift(segments);
    for (int64_t s = 0; s < segments; ++s) tables.at(s, center[s], scale[s], shift[s]);
    kernel_table().get<scalar_t>().apply(in.geometry, in.x.const_data_ptr<scalar_t>(), center.data(), scale.data(),
                                         shift.data(), y.data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> segment_grad_sums(const at::Tensor& grad_output, const SegmentInput& in,
                                                     const at::Tensor& center, int64_t segments_per_stat) {
  const at::Tensor dy = same_layout(grad_output, in);
  at::Tensor sum_dy = new_output({in.channels, in.pieces}, table_options(in));
  at::Tensor sum_dy_xc = new_output({in.channels, in.pieces}, table_options(in));
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_grad_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> spread;
    const acc_t* c = segment_centers<acc_t>(center, segments_per_stat, in.channels * in.pieces, spread);
    kernel_table().get<scalar_t>().grad_sums(in.geometry, dy.const_data_ptr<scalar_t>(),
                                             in.x.const_data_ptr<scalar_t>(), c, sum_dy.data_ptr<acc_t>(),
                                             sum_dy_xc.data_ptr<acc_t>());
  });
  return {sum_dy, sum_dy_xc};
}

at::Tensor segment_grad_apply(const at::Tensor& grad_output, const SegmentInput& in, const at::Tensor& center,
                              int64_t segments_per_stat, const at::Tensor& k_dy, const at::Tensor& k_x,
                              const at::Tensor& k_0) {
  const at::Tensor dy = same_layout(grad_output, in);
  at::Tensor dx = new_output(in.x.sizes(), in.x.options(), in.format);
  STOCHNORM_DISPATCH(in.x.scalar_type(), "segment_grad_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> spread;
    const acc_t* c = segment_centers<acc_t>(center, segments_per_stat, in.channels * in.pieces, spread);
    kernel_table().get<scalar_t>().grad_apply(in.geometry, dy.const_data_ptr<scalar_t>(),
                                              in.x.const_data_ptr<scalar_t>(), c, k_dy.const_data_ptr<acc_t>(),
                                              k_x.const_data_ptr<acc_t>(), k_0.const_data_ptr<acc_t>(),
                                              dx.data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace stochnorm_ext::cpu
