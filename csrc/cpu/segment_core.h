// The shared CPU core: four big memory-bound passes over segments, used by all
// three layers (see csrc/coefficients.h for what a segment is and the per-layer math).
//
//   stats       x              -> mean, m2 per segment          (m2 = sum of squared deviations)
//   apply       x, tables      -> y  = (x - center) * scale + shift
//   grad_sums   dy, x, center  -> sum dy, sum dy * (x - center) per segment
//   grad_apply  dy, x, tables  -> dx = k_dy * dy + k_x * (x - center) + k_0
//
// Tables are in the accumulation type (float; double for double input): the apply's and the
// centres per statistic (coefficients.h: ApplyTables, CenterTable; spread over the C * P
// segments before a kernel runs, P the pieces each channel's flattened positions are cut
// into), the backward apply's coefficients (C, P); the statistics (mean, m2) are double for
// every input (common::stats_table_options).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>

#include "../common.h"

namespace stochnorm_ext::cpu {

// How the kernels walk a dense (N, C, *S) tensor (the planar and interleaved layouts,
// described once at SegmentGeometry), the input made dense in its output format, output
// allocation with the poison fill: shared with the CUDA backend in csrc/common.h.
using common::SegmentGeometry;
using common::SegmentInput;

template <typename scalar_t>
struct SegmentKernels {
  using acc_t = at::opmath_type<scalar_t>;
  void (*stats)(const SegmentGeometry&, const scalar_t* x, double* mean, double* m2);
  void (*apply)(const SegmentGeometry&, const scalar_t* x, const acc_t* center, const acc_t* scale,
                const acc_t* shift, scalar_t* y);
  void (*grad_sums)(const SegmentGeometry&, const scalar_t* dy, const scalar_t* x, const acc_t* center,
                    acc_t* sum_dy, acc_t* sum_dy_xc);
  void (*grad_apply)(const SegmentGeometry&, const scalar_t* dy, const scalar_t* x, const acc_t* center,
                     const acc_t* k_dy, const acc_t* k_x, const acc_t* k_0, scalar_t* dx);
};

// One instantiation of the kernels per dtype, compiled for one CPU capability.
struct KernelTable {
  SegmentKernels<float> f32;
  SegmentKernels<double> f64;
  SegmentKernels<c10::BFloat16> bf16;
  SegmentKernels<c10::Half> f16;

  template <typename scalar_t>
  const SegmentKernels<scalar_t>& get() const {
    if constexpr (std::is_same_v<scalar_t, float>) return f32;
    else if constexpr (std::is_same_v<scalar_t, double>) return f64;
    else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return bf16;
    else return f16;
  }
};

// segment_kernels_default.cpp: portable build. segment_kernels_avx2.cpp: AVX2+FMA build, or
// nullptr where it was not compiled (not x86-64).
const KernelTable* default_kernel_table();
const KernelTable* avx2_kernel_table();
// The table for this CPU: AVX2 when the CPU has it and ATen uses it (ATEN_CPU_CAPABILITY=default
// forces the portable kernels, as it does for ATen's own).
const KernelTable& kernel_table();

// ---------------------------------------------------------------------------- tensor level
using common::accumulate_type;
using common::new_output;       // at::empty, filled with NaN when STOCHNORM_EXT_POISON_OUTPUTS=1
using common::output_format;
using common::poison_outputs;
using common::same_layout;
using common::segment_input;

// The Device passes of csrc/ops_impl.h (what they take: there), over tables the ops have checked.
std::tuple<at::Tensor, at::Tensor> segment_stats(const SegmentInput& in, const at::Tensor& step_count);
at::Tensor segment_apply(const SegmentInput& in, const common::ApplyArgs& args);
std::tuple<at::Tensor, at::Tensor> segment_grad_sums(const at::Tensor& grad_output, const SegmentInput& in,
                                                     const at::Tensor& center, int64_t segments_per_stat);
at::Tensor segment_grad_apply(const at::Tensor& grad_output, const SegmentInput& in, const at::Tensor& center,
                              int64_t segments_per_stat, const at::Tensor& k_dy, const at::Tensor& k_x,
                              const at::Tensor& k_0);

}  // namespace stochnorm_ext::cpu
