// The planar layout's building blocks (csrc/common.h, SegmentGeometry): one row segment of
// `n` contiguous values, for each of the four passes (sums and deviations of the statistics,
// the gradient sums, the two elementwise passes). The passes (segment_kernels.h) cut the rows
// into blocks and call these; the interleaved layout's counterparts are in row_kernels.h.
//
// Compiled once per CPU capability, as part of segment_kernels.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "vec_steps.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including span_kernels.h (see segment_kernels.h)"
#endif

namespace stochnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// Reductions: wide steps, then IO steps (vector_steps, into the same accumulators), then
// single values.

template <typename scalar_t>
inline at::opmath_type<scalar_t> span_sum(const scalar_t* x, int64_t n) {
  using W = Wide<scalar_t>;
  using Vec = typename W::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  Vec acc[W::kVecs];
  W::zero(acc);
  int64_t i = vector_steps<scalar_t>(n, [&](int64_t pos, auto step) {
    using S = decltype(step);
    Vec v[S::kVecs];
    S::load(x + pos, v);
    for (int j = 0; j < S::kVecs; ++j) acc[j] += v[j];
  });
  acc_t s = horizontal_sum(W::total(acc));
  for (; i < n; ++i) s += acc_t(x[i]);
  return s;
}

// Sums of the deviations from `center` and of their squares: the second pass of the corrected
// two-pass scheme. The float centre (the block's rounded mean) is only a shift: the residual
// sum restores the exact mean, center + sum / n, when the blocks are merged in double.
template <typename scalar_t>
inline void span_deviations(const scalar_t* x, int64_t n, at::opmath_type<scalar_t> center,
                            at::opmath_type<scalar_t>& sum_d, at::opmath_type<scalar_t>& sum_d2) {
  using W = Wide<scalar_t>;
  using Vec = typename W::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  const Vec center_v(center);
  Vec acc_d[W::kVecs], acc_d2[W::kVecs];
  W::zero(acc_d);
  W::zero(acc_d2);
  int64_t i = vector_steps<scalar_t>(n, [&](int64_t pos, auto step) {
    using S = decltype(step);
    Vec v[S::kVecs];
    S::load(x + pos, v);
    for (int j = 0; j < S::kVecs; ++j) {
      const Vec d = v[j] - center_v;
      acc_d[j] += d;
      acc_d2[j] = at::vec::fmadd(d, d, acc_d2[j]);
    }
  });
  acc_t s_d = horizontal_sum(W::total(acc_d)), s_d2 = horizontal_sum(W::total(acc_d2));
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - center;
    s_d += d;
    s_d2 += d * d;
  }
  sum_d = s_d;
  sum_d2 = s_d2;
}

// sum(dy) and sum(dy * (x - center)).
template <typename scalar_t>
inline void span_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t n, at::opmath_type<scalar_t> center,
                           at::opmath_type<scalar_t>& sum_dy, at::opmath_type<scalar_t>& sum_dy_xc) {
  using W = Wide<scalar_t>;
  using Vec = typename W::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  const Vec center_v(center);
  Vec acc_dy[W::kVecs], acc_dyxc[W::kVecs];
  W::zero(acc_dy);
  W::zero(acc_dyxc);
  int64_t i = vector_steps<scalar_t>(n, [&](int64_t pos, auto step) {
    using S = decltype(step);
    Vec vdy[S::kVecs], vx[S::kVecs];
    S::load(dy + pos, vdy);
    S::load(x + pos, vx);
    for (int j = 0; j < S::kVecs; ++j) {
      acc_dy[j] += vdy[j];
      acc_dyxc[j] = at::vec::fmadd(vdy[j], vx[j] - center_v, acc_dyxc[j]);
    }
  });
  acc_t s_dy = horizontal_sum(W::total(acc_dy)), s_dyxc = horizontal_sum(W::total(acc_dyxc));
  for (; i < n; ++i) {
    const acc_t g = acc_t(dy[i]);
    s_dy += g;
    s_dyxc += g * (acc_t(x[i]) - center);
  }
  sum_dy = s_dy;
  sum_dy_xc = s_dyxc;
}

// y = (x - center) * scale + shift.
template <typename scalar_t>
inline void span_apply(const scalar_t* x, scalar_t* y, int64_t n, at::opmath_type<scalar_t> center,
                       at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t> shift) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  const Vec center_v(center), scale_v(scale), shift_v(shift);
  Vec v[IO::kVecs];
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    IO::load(x + i, v);
    for (int k = 0; k < IO::kVecs; ++k) v[k] = at::vec::fmadd(v[k] - center_v, scale_v, shift_v);
    IO::store(y + i, v);
  }
  for (; i < n; ++i) y[i] = scalar_t((acc_t(x[i]) - center) * scale + shift);
}

// dx = k_dy * dy + k_x * (x - center) + k_0.
template <typename scalar_t>
inline void span_grad_apply(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n,
                            at::opmath_type<scalar_t> center, at::opmath_type<scalar_t> k_dy,
                            at::opmath_type<scalar_t> k_x, at::opmath_type<scalar_t> k_0) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  const Vec center_v(center), k_dy_v(k_dy), k_x_v(k_x), k_0_v(k_0);
  Vec vdy[IO::kVecs], vx[IO::kVecs];
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    IO::load(dy + i, vdy);
    IO::load(x + i, vx);
    for (int k = 0; k < IO::kVecs; ++k) {
      vx[k] = at::vec::fmadd(k_dy_v, vdy[k], at::vec::fmadd(k_x_v, vx[k] - center_v, k_0_v));
    }
    IO::store(dx + i, vx);
  }
  for (; i < n; ++i) dx[i] = scalar_t(k_dy * acc_t(dy[i]) + k_x * (acc_t(x[i]) - center) + k_0);
}

}  // namespace CPU_CAPABILITY
}  // namespace stochnorm_ext::cpu
