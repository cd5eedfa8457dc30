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
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../welford.h"
#include "segment_core.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including segment_kernels.h"
#endif

namespace stochnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Values of one contiguous row taken as one two-pass block (8 KiB of float: stays in L1).
constexpr int64_t kPlanarBlock = 2048;
// Values (rows x channels) of one interleaved two-pass block (32 KiB of float: L1/L2), enough
// rows that the per-block merge (O(C), in double) stays small next to the block's work.
constexpr int64_t kInterleavedBlock = 8192;
// Below this many values per task a thread is not worth starting (ATen's GRAIN_SIZE).
constexpr int64_t kMinParallelValues = 32768;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grain (in work units) so that each parallel task gets about kMinParallelValues values.
inline int64_t grain_for(int64_t values_per_unit) {
  return std::max<int64_t>(1, kMinParallelValues / std::max<int64_t>(1, values_per_unit));
}

// Loads kStep values of scalar_t as kVecs vectors of the accumulation type, and back.
// bfloat16/half: one Vectorized<scalar_t> is two float vectors.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kStep = Vec::size() * kVecs;

  static inline void load(const scalar_t* p, Vec* v) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, v[0], v[1]);
    } else {
      v[0] = Vec::loadu(p);
    }
  }
  static inline void store(scalar_t* p, const Vec* v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
  // kVecs consecutive vectors of a table in the accumulation type.
  static inline void load_table(const acc_t* p, Vec* v) {
    for (int k = 0; k < kVecs; ++k) v[k] = Vec::loadu(p + k * Vec::size());
  }
};

template <typename acc_t>
inline acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// (count, mean, m2) of a set of values, merged in double: partial results of blocks and
// chunks are few, so the precision is free.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double count_b, double mean_b, double m2_b) {
    welford::chan_merge(count, mean, m2, count_b, mean_b, m2_b);
  }
};

// Reductions keep kWide = 4 independent vector accumulators so that the adds are not one
// latency-bound chain; Wide loads 4 vectors of consecutive values (1, 2 or 4 IO steps).
template <typename scalar_t>
struct Wide {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int kVecs = 4;
  static constexpr int64_t kWidth = kVecs * Vec::size();  // values per load
  static_assert(kVecs % IO::kVecs == 0, "a wide load is whole IO steps");

  static inline Vec total(const Vec* acc) { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }
  static inline void zero(Vec* acc) {
    for (int j = 0; j < kVecs; ++j) acc[j] = Vec(typename IO::acc_t(0));
  }
};

// One vector step of a reduction: K vectors (Wide::kVecs, or IO::kVecs for the last whole IO
// steps) of consecutive values or table entries. K is a compile-time constant, so each step
// is its own fully unrolled loop.
template <typename scalar_t, int K>
struct Step {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int kVecs = K;
  static constexpr int64_t kWidth = K * Vec::size();  // values per step
  static_assert(K % IO::kVecs == 0, "a step is whole IO steps");

  static inline void load(const scalar_t* p, Vec* v) {
    for (int u = 0; u < K / IO::kVecs; ++u) IO::load(p + u * IO::kStep, v + u * IO::kVecs);
  }
  static inline void load_table(const typename IO::acc_t* p, Vec* v) {
    for (int j = 0; j < K; ++j) v[j] = Vec::loadu(p + j * Vec::size());
  }
};

// Walks [0, n) as a reduction does: body(i, Step<scalar_t, K>()) for wide steps (K = 4
// vectors) while they fit, then for IO steps (K = IO::kVecs); returns where the values left
// for the scalar tail begin.
template <typename scalar_t, typename Body>
inline int64_t vector_steps(int64_t n, const Body& body) {
  using WideStep = Step<scalar_t, Wide<scalar_t>::kVecs>;
  using IOStep = Step<scalar_t, VecIO<scalar_t>::kVecs>;
  int64_t i = 0;
  for (; i + WideStep::kWidth <= n; i += WideStep::kWidth) body(i, WideStep());
  for (; i + IOStep::kWidth <= n; i += IOStep::kWidth) body(i, IOStep());
  return i;
}

// ============================================================================ contiguous spans
// The planar layout's building blocks: one row segment of `n` contiguous values. Wide steps,
// then IO steps (vector_steps, into the same accumulators), then single values.

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

// ============================================================================ channel rows
// The interleaved layout's building blocks: `rows` consecutive rows of C channels, the
// per-channel tables (C,) of one piece, vectorised across channels. Reductions walk the rows
// for one group of channels at a time (vector_steps: wide groups of 4 vectors, 4 independent
// accumulators, then IO steps), then the last channels one by one.

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

// Chan-merge a block's per-channel moments into a chunk's running ones, kept in double. The
// block is given as its float centre and the sums of deviations from it (rows_deviations): its
// exact mean is center + sum_d / n, its m2 is sum_d2 - sum_d^2 / n.
template <typename acc_t>
inline void merge_channel_moments(int64_t& count, double* mean, double* m2, int64_t count_b, const acc_t* center_b,
                                  const acc_t* sum_d, const acc_t* sum_d2, int64_t C) {
  const double nb = double(count_b);
  const double total = double(count) + nb;
  const double w = nb / total;                  // weight of the block's mean
  const double f = double(count) * nb / total;  // delta^2 factor
  for (int64_t c = 0; c < C; ++c) {
    const double residual = double(sum_d[c]) / nb;
    const double d = double(center_b[c]) + residual - mean[c];
    mean[c] += d * w;
    m2[c] += (double(sum_d2[c]) - double(sum_d[c]) * residual) + d * d * f;
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

// ============================================================================ the four passes

// Interleaved tables are read per piece as (C,) rows: a (P, C) copy of a (C, P) table.
template <typename acc_t>
class PieceTable {
 public:
  PieceTable(const acc_t* table, int64_t C, int64_t P) : data_(table) {
    if (P > 1) {
      copy_.resize(C * P);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) copy_[p * C + c] = table[c * P + p];
      data_ = copy_.data();
    }
    C_ = C;
  }
  const acc_t* piece(int64_t p) const { return data_ + p * C_; }

 private:
  const acc_t* data_;
  int64_t C_ = 0;
  std::vector<acc_t> copy_;
};

// Planar reductions: each segment's work is its N rows of L values, taken in blocks of about
// kPlanarBlock values (items): a piece of one long row, or several whole short rows (of
// consecutive samples). When there are few segments, the items of one segment are split into
// several chunks, so that a single long channel still uses every thread.
struct PlanarSplit {
  int64_t blocks_per_row;  // > 1: long rows cut into pieces
  int64_t rows_per_block;  // > 1: short rows grouped
  int64_t items, chunks;
  explicit PlanarSplit(const SegmentGeometry& g) {
    blocks_per_row = std::max<int64_t>(1, divup(g.L, kPlanarBlock));
    rows_per_block = std::max<int64_t>(1, kPlanarBlock / std::max<int64_t>(g.L, 1));
    items = blocks_per_row > 1 ? g.N * blocks_per_row : divup(g.N, rows_per_block);
    const int64_t units_wanted = 4 * at::get_num_threads();
    chunks = std::clamp<int64_t>(divup(units_wanted, g.segments()), 1, std::max<int64_t>(items, 1));
  }
  int64_t item_begin(int64_t chunk) const { return items * chunk / chunks; }
  int64_t values_per_unit(int64_t L) const { return divup(items, chunks) * std::min(L * rows_per_block, kPlanarBlock); }

  // Calls f(offset, length) for the spans of item `item` of segment r: offsets into the
  // (N, R, L) data.
  template <typename F>
  void for_each_span(const SegmentGeometry& g, int64_t r, int64_t item, const F& f) const {
    const int64_t R = g.segments(), L = g.L;
    if (blocks_per_row > 1) {
      const int64_t n = item / blocks_per_row, offset = (item % blocks_per_row) * kPlanarBlock;
      f((n * R + r) * L + offset, std::min(kPlanarBlock, L - offset));
      return;
    }
    const int64_t n_end = std::min(g.N, (item + 1) * rows_per_block);
    for (int64_t n = item * rows_per_block; n < n_end; ++n) f((n * R + r) * L, L);
  }
};

// Interleaved reductions: the rows (of C channels) are cut into a few contiguous chunks, one
// parallel task each, and every chunk keeps its own per-piece partial results, merged at the
// end in chunk order: no thread ids, and the same result whatever thread ran which chunk.
struct InterleavedSplit {
  int64_t rows, chunks, block_rows;
  explicit InterleavedSplit(const SegmentGeometry& g) {
    rows = g.N * g.P * g.L;
    chunks = std::clamp<int64_t>(divup(rows * g.C, kMinParallelValues), 1, at::get_num_threads());
    block_rows = std::clamp<int64_t>(kInterleavedBlock / std::max<int64_t>(g.C, 1), 1, 256);
  }
  int64_t row_begin(int64_t chunk) const { return rows * chunk / chunks; }

  // Calls f(q0, q1, p) for the blocks of rows [q0, q1) of chunk `chunk`; a block never
  // crosses a piece boundary (multiples of L), p is its piece.
  template <typename F>
  void for_each_block(const SegmentGeometry& g, int64_t chunk, const F& f) const {
    const int64_t end = row_begin(chunk + 1);
    for (int64_t q0 = row_begin(chunk); q0 < end;) {
      const int64_t q1 = std::min({q0 + block_rows, end, (q0 / g.L + 1) * g.L});
      f(q0, q1, (q0 / g.L) % g.P);
      q0 = q1;
    }
  }
};

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
