// What one CUDA thread does in the four passes of the shared core, written as plain
// C10_HOST_DEVICE functions of explicit (segment, first item, stride) arguments. The kernels
// in segment_kernels.cuh call these functions with indices taken from blockIdx/threadIdx and
// add the block reductions; because nothing here is CUDA-only, csrc/cuda/tests/walk_check.cpp
// compiles this header with the host compiler and replays every (block, thread) of a launch
// sequentially, which checks the work split, the indexing and the per-thread arithmetic
// without a GPU.
//
// How blocks and threads cover the geometry (item offsets, the lattice walk, launch shapes):
// walk_geometry.h; the states the reductions accumulate and merge: reduce_states.h; the
// layouts themselves: SegmentGeometry in csrc/common.h.
//
// Statistics are accumulated on values shifted by the first value of their segment (sample 0,
// position 0): data with a large common offset (1e4 + randn) then loses nothing in float32,
// since the difference of two floats within a factor 2 of each other is exact and Welford's
// updates run on values of the data's spread, not its offset. The shift is added back once,
// when the final mean is written.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "../coefficients.h"
#include "reduce_states.h"
#include "walk_geometry.h"

namespace stochnorm_ext::cuda {

template <typename scalar_t, int V>
C10_HOST_DEVICE inline void to_acc(const Pack<scalar_t, V>& p, acc_type<scalar_t> (&out)[V]) {
  for (int k = 0; k < V; ++k) out[k] = static_cast<acc_type<scalar_t>>(p.value[k]);
}

// ------------------------------------------------------------------------------ a thread's pass
// The elementwise passes on one thread's items, lanes k < V of each pack with their own
// coefficients (planar: V copies of the segment's): y = (x - center) * scale + shift, and
// dx = k_dy * dy + k_x * (x - center) + k_0.
template <typename scalar_t, int V, typename Offset>
C10_HOST_DEVICE void thread_apply(int64_t N, int64_t first, int64_t stride, int64_t inner_size, const Offset& offset,
                                  const scalar_t* x, scalar_t* y, const acc_type<scalar_t> (&center)[V],
                                  const acc_type<scalar_t> (&scale)[V], const acc_type<scalar_t> (&shift)[V]) {
  using acc_t = acc_type<scalar_t>;
  Pack<scalar_t, V> v[kUnroll];
  walk_items(
      N, first, stride, inner_size, offset, [&](int u, int64_t off) { v[u] = load_pack<scalar_t, V>(x + off); },
      [&](int u, int64_t off) {
        Pack<scalar_t, V> out;
        for (int k = 0; k < V; ++k) {
          out.value[k] = static_cast<scalar_t>((static_cast<acc_t>(v[u].value[k]) - center[k]) * scale[k] + shift[k]);
        }
        store_pack<scalar_t, V>(y + off, out);
      });
}

template <typename scalar_t, int V, typename Offset>
C10_HOST_DEVICE void thread_grad_apply(int64_t N, int64_t first, int64_t stride, int64_t inner_size,
                                       const Offset& offset, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                                       const acc_type<scalar_t> (&center)[V], const acc_type<scalar_t> (&k_dy)[V],
                                       const acc_type<scalar_t> (&k_x)[V], const acc_type<scalar_t> (&k_0)[V]) {
  using acc_t = acc_type<scalar_t>;
  Pack<scalar_t, V> vdy[kUnroll], vx[kUnroll];
  walk_items(
      N, first, stride, inner_size, offset,
      [&](int u, int64_t off) {
        vdy[u] = load_pack<scalar_t, V>(dy + off);
        vx[u] = load_pack<scalar_t, V>(x + off);
      },
      [&](int u, int64_t off) {
        Pack<scalar_t, V> out;
        for (int k = 0; k < V; ++k) {
          const acc_t xc = static_cast<acc_t>(vx[u].value[k]) - center[k];
          out.value[k] = static_cast<scalar_t>(k_dy[k] * static_cast<acc_t>(vdy[u].value[k]) + k_x[k] * xc + k_0[k]);
        }
        store_pack<scalar_t, V>(dx + off, out);
      });
}

// The gradient sums of one thread's items: lane k of each pack adds to s.dy[k % W] and
// s.dy_xc[k % W] (W = 1: one statistic, planar; W = V: one per lane, interleaved).
template <typename scalar_t, int V, int W, typename Offset>
C10_HOST_DEVICE void thread_grad_sums(int64_t N, int64_t first, int64_t stride, int64_t inner_size,
                                      const Offset& offset, const scalar_t* dy, const scalar_t* x,
                                      const acc_type<scalar_t> (&center)[W], Sums<acc_type<scalar_t>, W>& s) {
  using acc_t = acc_type<scalar_t>;
  Pack<scalar_t, V> vdy[kUnroll], vx[kUnroll];
  walk_items(
      N, first, stride, inner_size, offset,
      [&](int u, int64_t off) {
        vdy[u] = load_pack<scalar_t, V>(dy + off);
        vx[u] = load_pack<scalar_t, V>(x + off);
      },
      [&](int u, int64_t) {
        for (int k = 0; k < V; ++k) {
          const acc_t d = static_cast<acc_t>(vdy[u].value[k]);
          s.dy[k % W] += d;
          s.dy_xc[k % W] += d * (static_cast<acc_t>(vx[u].value[k]) - center[k % W]);
        }
      });
}

// The statistics of one thread's items: each pack's values, lane k shifted by shift[k % W],
// go to acc.add (PackWelford: one statistic, W = 1; LaneWelford: one per lane, W = V).
template <typename scalar_t, int V, int W, typename Offset, typename Acc>
C10_HOST_DEVICE void thread_stats(int64_t N, int64_t first, int64_t stride, int64_t inner_size, const Offset& offset,
                                  const scalar_t* x, const acc_type<scalar_t> (&shift)[W], Acc& acc) {
  using acc_t = acc_type<scalar_t>;
  Pack<scalar_t, V> v[kUnroll];
  walk_items(
      N, first, stride, inner_size, offset, [&](int u, int64_t off) { v[u] = load_pack<scalar_t, V>(x + off); },
      [&](int u, int64_t) {
        acc_t a[V];
        to_acc(v[u], a);
        for (int k = 0; k < V; ++k) a[k] -= shift[k % W];
        acc.add(a);
      });
}

// ------------------------------------------------------------------------------ planar threads
// The shift of segment r's statistics: its first value.
template <typename scalar_t>
C10_HOST_DEVICE acc_type<scalar_t> planar_shift(const WalkGeometry& g, const scalar_t* x, int64_t r) {
  return static_cast<acc_type<scalar_t>>(x[planar_offset(g, r, 0, 0, 1)]);
}

// Moments of the thread's values of segment r, shifted by planar_shift.
template <typename scalar_t, int V>
C10_HOST_DEVICE Moments<acc_type<scalar_t>, 1> planar_thread_stats(const WalkGeometry& g, const scalar_t* x,
                                                                   int64_t r, int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  const acc_t shift[1] = {planar_shift(g, x, r)};
  PackWelford<acc_t, V> acc;
  thread_stats<scalar_t, V, 1>(g.N, first, stride, g.L / V, PlanarOffset<V>{g, r}, x, shift, acc);
  return acc.moments();
}

template <typename scalar_t, int V>
C10_HOST_DEVICE Sums<acc_type<scalar_t>, 1> planar_thread_grad_sums(const WalkGeometry& g, const scalar_t* dy,
                                                                    const scalar_t* x, acc_type<scalar_t> center,
                                                                    int64_t r, int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  Sums<acc_t, 1> s;
  s.reset();
  const acc_t c[1] = {center};
  thread_grad_sums<scalar_t, V, 1>(g.N, first, stride, g.L / V, PlanarOffset<V>{g, r}, dy, x, c, s);
  return s;
}

// y = (x - center) * scale + shift on the thread's items of segment r.
template <typename scalar_t, int V>
C10_HOST_DEVICE void planar_thread_apply(const WalkGeometry& g, const scalar_t* x, scalar_t* y,
                                         acc_type<scalar_t> center, acc_type<scalar_t> scale,
                                         acc_type<scalar_t> shift, int64_t r, int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  acc_t c[V], a[V], b[V];
  for (int k = 0; k < V; ++k) {
    c[k] = center;
    a[k] = scale;
    b[k] = shift;
  }
  thread_apply<scalar_t, V>(g.N, first, stride, g.L / V, PlanarOffset<V>{g, r}, x, y, c, a, b);
}

// dx = k_dy * dy + k_x * (x - center) + k_0 on the thread's items of segment r.
template <typename scalar_t, int V>
C10_HOST_DEVICE void planar_thread_grad_apply(const WalkGeometry& g, const scalar_t* dy, const scalar_t* x,
                                              scalar_t* dx, acc_type<scalar_t> center, acc_type<scalar_t> k_dy,
                                              acc_type<scalar_t> k_x, acc_type<scalar_t> k_0, int64_t r,
                                              int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  acc_t c[V], a[V], b[V], z[V];
  for (int k = 0; k < V; ++k) {
    c[k] = center;
    a[k] = k_dy;
    b[k] = k_x;
    z[k] = k_0;
  }
  thread_grad_apply<scalar_t, V>(g.N, first, stride, g.L / V, PlanarOffset<V>{g, r}, dy, x, dx, c, a, b, z);
}

// ------------------------------------------------------------------------------ interleaved threads
// The shift of the statistics of lane k of channel pack cv in piece p: its first value.
template <typename scalar_t>
C10_HOST_DEVICE acc_type<scalar_t> interleaved_shift(const WalkGeometry& g, const scalar_t* x, int64_t cv, int64_t p,
                                                     int k, int V) {
  return static_cast<acc_type<scalar_t>>(x[interleaved_offset(g, cv, p, 0, 0, V) + k]);
}

// Moments of the thread's values of the V channels of pack cv in piece p, each lane shifted by
// interleaved_shift.
template <typename scalar_t, int V>
C10_HOST_DEVICE Moments<acc_type<scalar_t>, V> interleaved_thread_stats(const WalkGeometry& g, const scalar_t* x,
                                                                        int64_t cv, int64_t p, int64_t first,
                                                                        int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  LaneWelford<acc_t, V> acc;
  if (cv * V >= g.C) return acc.moments();
  acc_t shift[V];
  for (int k = 0; k < V; ++k) shift[k] = interleaved_shift(g, x, cv, p, k, V);
  thread_stats<scalar_t, V, V>(g.N, first, stride, g.L, InterleavedOffset<V>{g, cv, p}, x, shift, acc);
  return acc.moments();
}

// center_table: the segments' centres; lane k subtracts its segment's.
template <typename scalar_t, int V>
C10_HOST_DEVICE Sums<acc_type<scalar_t>, V> interleaved_thread_grad_sums(
    const WalkGeometry& g, const scalar_t* dy, const scalar_t* x,
    const coefficients::CenterTable<acc_type<scalar_t>>& center_table,
                                                                         int64_t cv, int64_t p, int64_t first,
                                                                         int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  Sums<acc_t, V> s;
  s.reset();
  if (cv * V >= g.C) return s;
  acc_t center[V];
  for (int k = 0; k < V; ++k) center[k] = center_table[interleaved_segment(g, cv, p, k, V)];
  thread_grad_sums<scalar_t, V, V>(g.N, first, stride, g.L, InterleavedOffset<V>{g, cv, p}, dy, x, center, s);
  return s;
}

template <typename scalar_t, int V>
C10_HOST_DEVICE void interleaved_thread_apply(const WalkGeometry& g, const scalar_t* x, scalar_t* y,
                                              const coefficients::ApplyTables<acc_type<scalar_t>>& tables,
                                              int64_t cv, int64_t p, int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  if (cv * V >= g.C) return;
  acc_t center[V], scale[V], shift[V];
  for (int k = 0; k < V; ++k) tables.at(interleaved_segment(g, cv, p, k, V), center[k], scale[k], shift[k]);
  thread_apply<scalar_t, V>(g.N, first, stride, g.L, InterleavedOffset<V>{g, cv, p}, x, y, center, scale, shift);
}

template <typename scalar_t, int V>
C10_HOST_DEVICE void interleaved_thread_grad_apply(const WalkGeometry& g, const scalar_t* dy, const scalar_t* x,
                                                   scalar_t* dx,
                                                   const coefficients::CenterTable<acc_type<scalar_t>>& center_table,
                                                   const acc_type<scalar_t>* k_dy_table,
                                                   const acc_type<scalar_t>* k_x_table,
                                                   const acc_type<scalar_t>* k_0_table, int64_t cv, int64_t p,
                                                   int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  if (cv * V >= g.C) return;
  acc_t center[V], k_dy[V], k_x[V], k_0[V];
  for (int k = 0; k < V; ++k) {
    const int64_t s = interleaved_segment(g, cv, p, k, V);
    center[k] = center_table[s];
    k_dy[k] = k_dy_table[s];
    k_x[k] = k_x_table[s];
    k_0[k] = k_0_table[s];
  }
  thread_grad_apply<scalar_t, V>(g.N, first, stride, g.L, InterleavedOffset<V>{g, cv, p}, dy, x, dx, center, k_dy,
                                 k_x, k_0);
}

}  // namespace stochnorm_ext::cuda
