// The four passes of the shared core (segment_core.h) as templates over the input dtype.
//
// Included by segment_kernels_default.cpp and segment_kernels_avx2.cpp, which set
// CPU_CAPABILITY (and CPU_CAPABILITY_AVX2) first: ATen's at::vec::Vectorized picks its
// instruction set from those macros, and the inline namespace keeps the two builds apart.
//
// Parallel with at::parallel_for, vectorised with at::vec::Vectorized over the accumulation
// type: bfloat16/half values are converted to float as they are loaded and rounded once when
// stored, so statistics accumulate in float (double for double input).
//
// Accuracy of the statistics: values are taken in blocks that stay in L1, each block by two
// passes (its mean, then the deviations from it: the corrected two-pass scheme), and blocks
// are folded together with Chan's formula, in double, and stored in double (a float mean at a
// large offset would lose the spread between the segments of a BGN group). No E[x^2] - E[x]^2,
// so data with a large common offset (1e6 + randn in float32) keeps its variance. Backward
// sums: per block in float, blocks added in double.
//
// This file holds the four passes (stats, apply, grad_sums, grad_apply) and the per-capability
// kernel table; their building blocks are in vec_steps.h (vector idiom), span_kernels.h
// (planar rows), row_kernels.h (interleaved rows) and work_split.h (how the work is cut among
// threads). The layouts themselves are described once, at SegmentGeometry in csrc/common.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../welford.h"
#include "row_kernels.h"
#include "segment_core.h"
#include "span_kernels.h"
#include "vec_steps.h"
#include "work_split.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including segment_kernels.h"
#endif

namespace stochnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// (count, mean, m2) of a set of values, merged in double (welford.h): partial results of
// blocks and chunks are few, so the precision is free.
using Moments = welford::Moments<double>;

template <typename scalar_t>
void stats_kernel(const SegmentGeometry& g, const scalar_t* x, double* mean_out, double* m2_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, P = g.P, L = g.L, R = g.segments();
  if (!g.interleaved) {
    const PlanarSplit split(g);
    std::vector<Moments> partial(R * split.chunks);
    at::parallel_for(0, R * split.chunks, grain_for(split.values_per_unit(L)), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t r = unit / split.chunks, chunk = unit % split.chunks;
        Moments m;
        for (int64_t item = split.item_begin(chunk); item < split.item_begin(chunk + 1); ++item) {
          // Two passes over the block while it is in L1: its mean, then the squared deviations.
          acc_t sum = 0;
          int64_t count = 0;
          split.for_each_span(g, r, item, [&](int64_t offset, int64_t len) {
            sum += span_sum(x + offset, len);
            count += len;
          });
          const acc_t block_center = sum / acc_t(count);  // rounded: corrected below
          acc_t sum_d = 0, sum_d2 = 0;
          split.for_each_span(g, r, item, [&](int64_t offset, int64_t len) {
            acc_t d, d2;
            span_deviations(x + offset, len, block_center, d, d2);
            sum_d += d;
            sum_d2 += d2;
          });
          const double residual = double(sum_d) / double(count);
          m.merge(double(count), double(block_center) + residual, double(sum_d2) - double(sum_d) * residual);
        }
        partial[unit] = m;
      }
    });
    for (int64_t r = 0; r < R; ++r) {
      Moments m;
      for (int64_t chunk = 0; chunk < split.chunks; ++chunk) {
        const Moments& part = partial[r * split.chunks + chunk];
        m.merge(part.count, part.mean, part.m2);
      }
      mean_out[r] = m.mean;
      m2_out[r] = m.m2;
    }
    return;
  }
  // Interleaved: rows q of C channels, row q at x + q * C, piece (q / L) % P. Each chunk
  // folds its blocks of rows into its own per-piece moments (double).
  const InterleavedSplit split(g);
  std::vector<int64_t> part_count(split.chunks * P, 0);
  std::vector<double> part_mean(split.chunks * P * C, 0.0), part_m2(split.chunks * P * C, 0.0);
  at::parallel_for(0, split.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_center(C), sum_d(C), sum_d2(C);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      split.for_each_block(g, chunk, [&](int64_t q0, int64_t q1, int64_t p) {
        const int64_t nb = q1 - q0;
        // Two passes over the block while it is in L1: its (rounded) mean, then the deviations.
        rows_sum(x + q0 * C, nb, C, block_center.data());
        const acc_t inv_nb = acc_t(1) / acc_t(nb);
        for (int64_t c = 0; c < C; ++c) block_center[c] *= inv_nb;
        rows_deviations(x + q0 * C, nb, C, block_center.data(), sum_d.data(), sum_d2.data());
        const int64_t slot = chunk * P + p;
        merge_channel_moments(part_count[slot], part_mean.data() + slot * C, part_m2.data() + slot * C, nb,
                              block_center.data(), sum_d.data(), sum_d2.data(), C);
      });
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      Moments m;
      for (int64_t chunk = 0; chunk < split.chunks; ++chunk) {
        const int64_t slot = chunk * P + p;
        m.merge(double(part_count[slot]), part_mean[slot * C + c], part_m2[slot * C + c]);
      }
      mean_out[c * P + p] = m.mean;
      m2_out[c * P + p] = m.m2;
    }
  }
}

template <typename scalar_t>
void apply_kernel(const SegmentGeometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* center,
                  const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, P = g.P, L = g.L, R = g.segments();
  if (!g.interleaved) {
    // Element range split across threads; each piece of it walks whole or partial rows.
    at::parallel_for(0, g.N * R * L, kMinParallelValues, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end;) {
        const int64_t row = pos / L, len = std::min(L - pos % L, end - pos), r = row % R;
        span_apply(x + pos, y + pos, len, center[r], scale[r], shift[r]);
        pos += len;
      }
    });
    return;
  }
  const PieceTable<acc_t> ctr(center, C, P), scl(scale, C, P), sft(shift, C, P);
  at::parallel_for(0, g.N * P * L, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t p = (q / L) % P;
      row_apply(x + q * C, y + q * C, C, ctr.piece(p), scl.piece(p), sft.piece(p));
    }
  });
}

template <typename scalar_t>
void grad_sums_kernel(const SegmentGeometry& g, const scalar_t* dy, const scalar_t* x,
                      const at::opmath_type<scalar_t>* center, at::opmath_type<scalar_t>* sum_dy_out,
                      at::opmath_type<scalar_t>* sum_dy_xc_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, P = g.P, L = g.L, R = g.segments();
  if (!g.interleaved) {
    const PlanarSplit split(g);
    std::vector<double> partial_dy(R * split.chunks), partial_dyxc(R * split.chunks);
    at::parallel_for(0, R * split.chunks, grain_for(split.values_per_unit(L)), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t r = unit / split.chunks, chunk = unit % split.chunks;
        double s_dy = 0, s_dyxc = 0;  // spans' float sums added in double: two-level summation
        for (int64_t item = split.item_begin(chunk); item < split.item_begin(chunk + 1); ++item) {
          split.for_each_span(g, r, item, [&](int64_t offset, int64_t len) {
            acc_t b_dy, b_dyxc;
            span_grad_sums(dy + offset, x + offset, len, center[r], b_dy, b_dyxc);
            s_dy += b_dy;
            s_dyxc += b_dyxc;
          });
        }
        partial_dy[unit] = s_dy;
        partial_dyxc[unit] = s_dyxc;
      }
    });
    for (int64_t r = 0; r < R; ++r) {
      double s_dy = 0, s_dyxc = 0;
      for (int64_t chunk = 0; chunk < split.chunks; ++chunk) {
        s_dy += partial_dy[r * split.chunks + chunk];
        s_dyxc += partial_dyxc[r * split.chunks + chunk];
      }
      sum_dy_out[r] = acc_t(s_dy);
      sum_dy_xc_out[r] = acc_t(s_dyxc);
    }
    return;
  }
  const PieceTable<acc_t> ctr(center, C, P);
  const InterleavedSplit split(g);
  std::vector<double> part_dy(split.chunks * P * C, 0.0), part_dyxc(split.chunks * P * C, 0.0);
  at::parallel_for(0, split.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b_dy(C), b_dyxc(C);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      split.for_each_block(g, chunk, [&](int64_t q0, int64_t q1, int64_t p) {
        rows_grad_sums(dy + q0 * C, x + q0 * C, q1 - q0, C, ctr.piece(p), b_dy.data(), b_dyxc.data());
        double* s_dy = part_dy.data() + (chunk * P + p) * C;
        double* s_dyxc = part_dyxc.data() + (chunk * P + p) * C;
        for (int64_t c = 0; c < C; ++c) {  // block sums added in double: two-level summation
          s_dy[c] += b_dy[c];
          s_dyxc[c] += b_dyxc[c];
        }
      });
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      double s_dy = 0, s_dyxc = 0;
      for (int64_t chunk = 0; chunk < split.chunks; ++chunk) {
        s_dy += part_dy[(chunk * P + p) * C + c];
        s_dyxc += part_dyxc[(chunk * P + p) * C + c];
      }
      sum_dy_out[c * P + p] = acc_t(s_dy);
      sum_dy_xc_out[c * P + p] = acc_t(s_dyxc);
    }
  }
}

template <typename scalar_t>
void grad_apply_kernel(const SegmentGeometry& g, const scalar_t* dy, const scalar_t* x,
                       const at::opmath_type<scalar_t>* center, const at::opmath_type<scalar_t>* k_dy,
                       const at::opmath_type<scalar_t>* k_x, const at::opmath_type<scalar_t>* k_0, scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, P = g.P, L = g.L, R = g.segments();
  if (!g.interleaved) {
    at::parallel_for(0, g.N * R * L, kMinParallelValues, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end;) {
        const int64_t row = pos / L, len = std::min(L - pos % L, end - pos), r = row % R;
        span_grad_apply(dy + pos, x + pos, dx + pos, len, center[r], k_dy[r], k_x[r], k_0[r]);
        pos += len;
      }
    });
    return;
  }
  const PieceTable<acc_t> ctr(center, C, P), a(k_dy, C, P), b(k_x, C, P), z(k_0, C, P);
  at::parallel_for(0, g.N * P * L, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t p = (q / L) % P;
      row_grad_apply(dy + q * C, x + q * C, dx + q * C, C, ctr.piece(p), a.piece(p), b.piece(p), z.piece(p));
    }
  });
}

template <typename scalar_t>
constexpr SegmentKernels<scalar_t> make_kernels() {
  return {&stats_kernel<scalar_t>, &apply_kernel<scalar_t>, &grad_sums_kernel<scalar_t>,
          &grad_apply_kernel<scalar_t>};
}

inline const KernelTable* make_kernel_table() {
  static const KernelTable table{make_kernels<float>(), make_kernels<double>(), make_kernels<c10::BFloat16>(),
                                 make_kernels<c10::Half>()};
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace stochnorm_ext::cpu
