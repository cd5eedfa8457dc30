// The interleaved layout's building blocks (csrc/common.h, SegmentGeometry): `rows`
// consecutive rows of C channels, the per-channel tables (C,) of one piece, vectorised across
// channels, for each of the four passes; plus the Chan merge of one block's per-channel
// moments (welford.h). The passes (segment_kernels.h) cut the rows into blocks and call these;
// the planar layout's counterparts are in span_kernels.h.
//
// Reductions walk the rows for one group of channels at a time (vector_steps: wide groups of
// 4 vectors, 4 independent accumulators, then IO steps), then the last channels one by one.
//
// Compiled once per CPU capability, as part of segment_kernels.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "../welford.h"
#include "vec_steps.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including row_kernels.h (see segment_kernels.h)"
#endif

namespace stochnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// out[c] = sum over rows of x[row, c].
template <typename scalar_t>
inline void rows_sum(const scalar_t* x, int64_t rows, int64_t C, at::opmath_type<scalar_t>* out) {
  using Vec = typename VecIO<scalar_t>::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  int64_t c = vector_steps<scalar_t>(C, [&](int64_t c0, auto step) {
    using S = decltype(step);
    Vec acc[S::kVecs], v[S::kVecs];
    for (int j = 0; j < S::kVecs; ++j) acc[j] = Vec(acc_t(0));
    for (int64_t q = 0; q < rows; ++q) {
      S::load(x + q * C + c0, v);
      for (int j = 0; j < S::kVecs; ++j) acc[j] += v[j];
    }
    for (int j = 0; j < S::kVecs; ++j) acc[j].store(out + c0 + j * Vec::size());
  });
  for (; c < C; ++c) {
    acc_t s = 0;
    for (int64_t q = 0; q < rows; ++q) s += acc_t(x[q * C + c]);
    out[c] = s;
  }
}

// sum_d[c] = sum over rows of (x[row, c] - center[c]), sum_d2[c] = of its square (see
// span_deviations).
template <typename scalar_t>
inline void rows_deviations(const scalar_t* x, int64_t rows, int64_t C, const at::opmath_type<scalar_t>* center,
                            at::opmath_type<scalar_t>* sum_d, at::opmath_type<scalar_t>* sum_d2) {
  using Vec = typename VecIO<scalar_t>::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  int64_t c = vector_steps<scalar_t>(C, [&](int64_t c0, auto step) {
    using S = decltype(step);
    Vec acc_d[S::kVecs], acc_d2[S::kVecs], v[S::kVecs], m[S::kVecs];
    S::load_table(center + c0, m);
    for (int j = 0; j < S::kVecs; ++j) acc_d[j] = acc_d2[j] = Vec(acc_t(0));
    for (int64_t q = 0; q < rows; ++q) {
      S::load(x + q * C + c0, v);
      for (int j = 0; j < S::kVecs; ++j) {
        const Vec d = v[j] - m[j];
        acc_d[j] += d;
        acc_d2[j] = at::vec::fmadd(d, d, acc_d2[j]);
      }
    }
    for (int j = 0; j < S::kVecs; ++j) {
      acc_d[j].store(sum_d + c0 + j * Vec::size());
      acc_d2[j].store(sum_d2 + c0 + j * Vec::size());
    }
  });
  for (; c < C; ++c) {
    acc_t s_d = 0, s_d2 = 0;
    for (int64_t q = 0; q < rows; ++q) {
      const acc_t d = acc_t(x[q * C + c]) - center[c];
      s_d += d;
      s_d2 += d * d;
    }
    sum_d[c] = s_d;
    sum_d2[c] = s_d2;
  }
}

// Chan-merge a block's per-channel moments into a chunk's running ones, kept in double
// (welford::chan_merge per channel). The block is given as its float centre and the sums of
// deviations from it (rows_deviations): its exact mean is center + sum_d / n, its m2 is
// sum_d2 - sum_d^2 / n.
template <typename acc_t>
inline void merge_channel_moments(int64_t& count, double* mean, double* m2, int64_t count_b, const acc_t* center_b,
                                  const acc_t* sum_d, const acc_t* sum_d2, int64_t C) {
  const double nb = double(count_b);
  for (int64_t c = 0; c < C; ++c) {
    const double residual = double(sum_d[c]) / nb;
    double channel_count = double(count);  // chan_merge updates it; every channel has the same count
    welford::chan_merge(channel_count, mean[c], m2[c], nb, double(center_b[c]) + residual,
                        double(sum_d2[c]) - double(sum_d[c]) * residual);
  }
  count += count_b;
}

// sum_dy[c] = sum over rows of dy, sum_dy_xc[c] = sum over rows of dy * (x - center[c]).
template <typename scalar_t>
inline void rows_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t rows, int64_t C,
                           const at::opmath_type<scalar_t>* center, at::opmath_type<scalar_t>* sum_dy,
                           at::opmath_type<scalar_t>* sum_dy_xc) {
  using Vec = typename VecIO<scalar_t>::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  int64_t c = vector_steps<scalar_t>(C, [&](int64_t c0, auto step) {
    using S = decltype(step);
    Vec acc_dy[S::kVecs], acc_dyxc[S::kVecs], vdy[S::kVecs], vx[S::kVecs], ctr[S::kVecs];
    S::load_table(center + c0, ctr);
    for (int j = 0; j < S::kVecs; ++j) acc_dy[j] = acc_dyxc[j] = Vec(acc_t(0));
    for (int64_t q = 0; q < rows; ++q) {
      S::load(dy + q * C + c0, vdy);
      S::load(x + q * C + c0, vx);
      for (int j = 0; j < S::kVecs; ++j) {
        acc_dy[j] += vdy[j];
        acc_dyxc[j] = at::vec::fmadd(vdy[j], vx[j] - ctr[j], acc_dyxc[j]);
      }
    }
    for (int j = 0; j < S::kVecs; ++j) {
      acc_dy[j].store(sum_dy + c0 + j * Vec::size());
      acc_dyxc[j].store(sum_dy_xc + c0 + j * Vec::size());
    }
  });
  for (; c < C; ++c) {
    acc_t s_dy = 0, s_dyxc = 0;
    for (int64_t q = 0; q < rows; ++q) {
      const acc_t g = acc_t(dy[q * C + c]);
      s_dy += g;
      s_dyxc += g * (acc_t(x[q * C + c]) - center[c]);
    }
    sum_dy[c] = s_dy;
    sum_dy_xc[c] = s_dyxc;
  }
}

// One row: y[c] = (x[c] - center[c]) * scale[c] + shift[c].
template <typename scalar_t>
inline void row_apply(const scalar_t* x, scalar_t* y, int64_t C, const at::opmath_type<scalar_t>* center,
                      const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  Vec v[IO::kVecs], ctr[IO::kVecs], scl[IO::kVecs], sft[IO::kVecs];
  int64_t c = 0;
  for (; c + IO::kStep <= C; c += IO::kStep) {
    IO::load(x + c, v);
    IO::load_table(center + c, ctr);
    IO::load_table(scale + c, scl);
    IO::load_table(shift + c, sft);
    for (int k = 0; k < IO::kVecs; ++k) v[k] = at::vec::fmadd(v[k] - ctr[k], scl[k], sft[k]);
    IO::store(y + c, v);
  }
  for (; c < C; ++c) y[c] = scalar_t((acc_t(x[c]) - center[c]) * scale[c] + shift[c]);
}

// One row: dx[c] = k_dy[c] * dy[c] + k_x[c] * (x[c] - center[c]) + k_0[c].
template <typename scalar_t>
inline void row_grad_apply(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C,
                           const at::opmath_type<scalar_t>* center, const at::opmath_type<scalar_t>* k_dy,
                           const at::opmath_type<scalar_t>* k_x, const at::opmath_type<scalar_t>* k_0) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  Vec vdy[IO::kVecs], vx[IO::kVecs], ctr[IO::kVecs], a[IO::kVecs], b[IO::kVecs], z[IO::kVecs];
  int64_t c = 0;
  for (; c + IO::kStep <= C; c += IO::kStep) {
    IO::load(dy + c, vdy);
    IO::load(x + c, vx);
    IO::load_table(center + c, ctr);
    IO::load_table(k_dy + c, a);
    IO::load_table(k_x + c, b);
    IO::load_table(k_0 + c, z);
    for (int k = 0; k < IO::kVecs; ++k) {
      vx[k] = at::vec::fmadd(a[k], vdy[k], at::vec::fmadd(b[k], vx[k] - ctr[k], z[k]));
    }
    IO::store(dx + c, vx);
  }
  for (; c < C; ++c) dx[c] = scalar_t(k_dy[c] * acc_t(dy[c]) + k_x[c] * (acc_t(x[c]) - center[c]) + k_0[c]);
}

}  // namespace CPU_CAPABILITY
}  // namespace stochnorm_ext::cpu
