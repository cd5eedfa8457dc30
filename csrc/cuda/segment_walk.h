// What one CUDA thread does in the four passes of the shared core, written as plain
// C10_HOST_DEVICE functions of explicit (segment, first item, stride) arguments, plus the host
// side that picks the launch shape. The kernels in segment_kernels.cuh call these functions
// with indices taken from blockIdx/threadIdx and add the block reductions; because nothing
// here is CUDA-only, csrc/cuda/tests/walk_check.cpp compiles this header with the host
// compiler and replays every (block, thread) of a launch sequentially, which checks the work
// split, the indexing and the per-thread arithmetic without a GPU.
//
// Layouts (see SegmentGeometry in csrc/common.h; N samples, C channels, P pieces, L values
// per (sample, segment), segment s = c * P + p):
//   planar       memory (N, R = C * P, L): a block owns one segment r (one row in every
//                sample) and a share ("split") of its N * L values, walked in memory order
//                V values (one 16-byte pack) at a time when L % V == 0.
//   interleaved  memory (N, P, L, C): a block owns a tile of bx channel packs of one piece p
//                and a split of the N * L positions; lane tx reads V adjacent channels of a
//                position, rows ty walk positions. Reductions run across positions (ty).
// A block's work is a lattice: item i of its segment has coordinates (outer, inner) =
// (i / inner_size, i % inner_size) and thread t visits items first, first + stride, ...; the
// LatticeCursor steps through them without a division in the loop. All indices are int64.
//
// Statistics are accumulated on values shifted by the first value of their segment (sample 0,
// position 0): data with a large common offset (1e4 + randn) then loses nothing in float32,
// since the difference of two floats within a factor 2 of each other is exact and Welford's
// updates run on values of the data's spread, not its offset. The shift is added back once,
// when the final mean is written.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "../welford.h"

namespace stochnorm_ext::cuda {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// ------------------------------------------------------------------------------ sizes
constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 256;
// Independent loads a thread issues before it uses them (keeps bytes in flight).
constexpr int kUnroll = 4;
// A split is worth making only if each of its threads gets at least this many items.
constexpr int64_t kMinItemsPerThread = 2 * kUnroll;
// Splits per segment of a reduction: the partials are merged by one block per segment.
constexpr int64_t kMaxReduceSplits = 1024;
// Splits of an elementwise pass (gridDim.y limit).
constexpr int64_t kMaxApplySplits = 65535;
// gridDim.x / gridDim.z limits; bigger counts are looped over inside the kernels.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

// Values of one 16-byte load/store.
template <typename scalar_t>
constexpr int kPackWidth = int(16 / sizeof(scalar_t));

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ geometry
// The dense tensor as the kernels walk it (SegmentGeometry of csrc/common.h, plain data).
struct WalkGeometry {
  int64_t N;  // samples
  int64_t C;  // channels (as walked)
  int64_t P;  // pieces per channel (as walked)
  int64_t L;  // values per (sample, segment)
  C10_HOST_DEVICE int64_t segments() const { return C * P; }
};

// ------------------------------------------------------------------------------ packs
// V consecutive values, loaded and stored as one (16-byte when V = kPackWidth) access.
// The caller guarantees the address is a multiple of sizeof(Pack).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T value[V];
};

template <typename T, int V>
C10_HOST_DEVICE inline Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
C10_HOST_DEVICE inline void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// ------------------------------------------------------------------------------ lattice cursor
// Item index first + k * stride as (outer, inner) digits with inner in [0, inner_size); the
// two divisions happen once, advance() only adds and carries.
struct LatticeCursor {
  int64_t outer, inner;
  int64_t step_outer, step_inner;  // stride = step_outer * inner_size + step_inner
  int64_t inner_size;

  C10_HOST_DEVICE LatticeCursor(int64_t first, int64_t stride, int64_t inner_size_)
      : outer(first / inner_size_),
        inner(first % inner_size_),
        step_outer(stride / inner_size_),
        step_inner(stride % inner_size_),
        inner_size(inner_size_) {}

  C10_HOST_DEVICE void advance() {
    outer += step_outer;
    inner += step_inner;
    if (inner >= inner_size) {  // step_inner < inner_size: one carry at most
      inner -= inner_size;
      ++outer;
    }
  }
};

// ------------------------------------------------------------------------------ reduction states
// Plain aggregates (no constructors) so that they can live in __shared__ arrays.

// Moments of V lanes that have seen the same number of values (count): mean and m2 (sum of
// squared deviations from the mean) per lane. Merged with Chan's formula.
template <typename T, int V>
struct Moments {
  T count;
  T mean[V];
  T m2[V];

  C10_HOST_DEVICE void reset() {
    count = T(0);
    for (int k = 0; k < V; ++k) mean[k] = m2[k] = T(0);
  }
  C10_HOST_DEVICE void merge(const Moments& b) {
    for (int k = 0; k < V; ++k) {
      T lane_count = count;  // chan_merge updates it; every lane would compute the same total
      welford::chan_merge(lane_count, mean[k], m2[k], b.count, b.mean[k], b.m2[k]);
    }
    count += b.count;
  }
};

// Sums of dy and dy * (x - center) of V lanes.
template <typename T, int V>
struct Sums {
  T dy[V];
  T dy_xc[V];

  C10_HOST_DEVICE void reset() {
    for (int k = 0; k < V; ++k) dy[k] = dy_xc[k] = T(0);
  }
  C10_HOST_DEVICE void merge(const Sums& b) {
    for (int k = 0; k < V; ++k) {
      dy[k] += b.dy[k];
      dy_xc[k] += b.dy_xc[k];
    }
  }
};

// A thread's Welford accumulation with an exact integer count (a float count would stop
// growing at 2^24 values). Lanes: V independent statistics, one value each per step
// (interleaved: V channels of one position).
template <typename T, int V>
struct LaneWelford {
  int64_t count = 0;
  T mean[V] = {};
  T m2[V] = {};

  C10_HOST_DEVICE void add(const T (&x)[V]) {
    ++count;
    const T w = T(1) / T(count);
    for (int k = 0; k < V; ++k) {
      const T delta = x[k] - mean[k];
      mean[k] += delta * w;
      m2[k] += delta * (x[k] - mean[k]);
    }
  }
  C10_HOST_DEVICE Moments<T, V> moments() const {
    Moments<T, V> m;
    m.count = T(count);
    for (int k = 0; k < V; ++k) {
      m.mean[k] = mean[k];
      m.m2[k] = m2[k];
    }
    return m;
  }
};

// A thread's accumulation of packs of V values of one statistic (planar: V adjacent positions
// of one row): each pack's own mean and m2 (two passes in registers), folded in with Chan's
// formula, an exact integer count.
template <typename T, int V>
struct PackWelford {
  int64_t count = 0;
  T mean = T(0);
  T m2 = T(0);

  C10_HOST_DEVICE void add(const T (&x)[V]) {
    T sum = T(0);
    for (int k = 0; k < V; ++k) sum += x[k];
    const T pack_mean = sum / T(V);
    T pack_m2 = T(0);
    for (int k = 0; k < V; ++k) {
      const T d = x[k] - pack_mean;
      pack_m2 += d * d;
    }
    const int64_t before = count;
    count += V;
    const T w = T(V) / T(count);
    const T delta = pack_mean - mean;
    mean += delta * w;
    m2 += pack_m2 + delta * delta * T(before) * w;
  }
  C10_HOST_DEVICE Moments<T, 1> moments() const {
    Moments<T, 1> m;
    m.count = T(count);
    m.mean[0] = mean;
    m.m2[0] = m2;
    return m;
  }
};

template <typename scalar_t, int V>
C10_HOST_DEVICE inline void to_acc(const Pack<scalar_t, V>& p, acc_type<scalar_t> (&out)[V]) {
  for (int k = 0; k < V; ++k) out[k] = static_cast<acc_type<scalar_t>>(p.value[k]);
}

// ------------------------------------------------------------------------------ the walk
// A thread's items of one segment / channel pack: first, first + stride, ... (a lattice with
// inner coordinate in [0, inner_size)) while the outer one is < N, kUnroll at a time. Each
// round computes the offsets (offset(outer, inner)) and issues all its loads (load(u, off)
// into the caller's registers for slot u) before it uses any of them (use(u, off)), which
// keeps kUnroll loads in flight. Slots past the end of the walk are skipped.
template <typename Offset, typename Load, typename Use>
C10_HOST_DEVICE inline void walk_items(int64_t N, int64_t first, int64_t stride, int64_t inner_size,
                                       const Offset& offset, const Load& load, const Use& use) {
  LatticeCursor cur(first, stride, inner_size);
  while (cur.outer < N) {
    int64_t off[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue the loads first, use them after
      off[u] = cur.outer < N ? offset(cur.outer, cur.inner) : -1;
      if (off[u] >= 0) load(u, off[u]);
      cur.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (off[u] >= 0) use(u, off[u]);
    }
  }
}

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
// Segment r = row r of every sample; item (n, i) is the pack at element (n * R + r) * L + i * V.
C10_HOST_DEVICE inline int64_t planar_offset(const WalkGeometry& g, int64_t r, int64_t n, int64_t i, int V) {
  return (n * g.segments() + r) * g.L + i * V;
}

// Item (n, i) of segment r, as walk_items takes it.
template <int V>
struct PlanarOffset {
  const WalkGeometry& g;
  int64_t r;
  C10_HOST_DEVICE int64_t operator()(int64_t n, int64_t i) const { return planar_offset(g, r, n, i, V); }
};

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
// Channel pack cv (channels cv * V .. cv * V + V - 1) of piece p; item (n, l) is the pack at
// element ((n * P + p) * L + l) * C + cv * V. A thread whose pack lies past the channels has
// no items (it still takes part in its block's reduction).
C10_HOST_DEVICE inline int64_t interleaved_offset(const WalkGeometry& g, int64_t cv, int64_t p, int64_t n, int64_t l,
                                                  int V) {
  return ((n * g.P + p) * g.L + l) * g.C + cv * V;
}

// Table entry (segment) of lane k of channel pack cv in piece p.
C10_HOST_DEVICE inline int64_t interleaved_segment(const WalkGeometry& g, int64_t cv, int64_t p, int k, int V) {
  return (cv * V + k) * g.P + p;
}

// The shift of the statistics of lane k of channel pack cv in piece p: its first value.
template <typename scalar_t>
C10_HOST_DEVICE acc_type<scalar_t> interleaved_shift(const WalkGeometry& g, const scalar_t* x, int64_t cv, int64_t p,
                                                     int k, int V) {
  return static_cast<acc_type<scalar_t>>(x[interleaved_offset(g, cv, p, 0, 0, V) + k]);
}

// Item (n, l) of channel pack cv in piece p, as walk_items takes it.
template <int V>
struct InterleavedOffset {
  const WalkGeometry& g;
  int64_t cv, p;
  C10_HOST_DEVICE int64_t operator()(int64_t n, int64_t l) const { return interleaved_offset(g, cv, p, n, l, V); }
};

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

// center_table: the (C, P) table of centers; lane k subtracts its segment's.
template <typename scalar_t, int V>
C10_HOST_DEVICE Sums<acc_type<scalar_t>, V> interleaved_thread_grad_sums(const WalkGeometry& g, const scalar_t* dy,
                                                                         const scalar_t* x,
                                                                         const acc_type<scalar_t>* center_table,
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
                                              const acc_type<scalar_t>* center_table,
                                              const acc_type<scalar_t>* scale_table,
                                              const acc_type<scalar_t>* shift_table, int64_t cv, int64_t p,
                                              int64_t first, int64_t stride) {
  using acc_t = acc_type<scalar_t>;
  if (cv * V >= g.C) return;
  acc_t center[V], scale[V], shift[V];
  for (int k = 0; k < V; ++k) {
    const int64_t s = interleaved_segment(g, cv, p, k, V);
    center[k] = center_table[s];
    scale[k] = scale_table[s];
    shift[k] = shift_table[s];
  }
  thread_apply<scalar_t, V>(g.N, first, stride, g.L, InterleavedOffset<V>{g, cv, p}, x, y, center, scale, shift);
}

template <typename scalar_t, int V>
C10_HOST_DEVICE void interleaved_thread_grad_apply(const WalkGeometry& g, const scalar_t* dy, const scalar_t* x,
                                                   scalar_t* dx, const acc_type<scalar_t>* center_table,
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

// ------------------------------------------------------------------------------ launch shapes
// grid (x, y, z) and block (x, y) of one pass. planar: grid (segments, splits, 1), block
// (threads, 1). interleaved: grid (channel-pack tiles, splits, pieces), block (bx, by).
// Grid x / z larger than the hardware allows are clamped here and looped over in the kernels.
struct LaunchShape {
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int block_x = 1, block_y = 1;
  int64_t splits = 1;  // == grid_y: how many blocks share one segment's values
};

// `target_blocks`: blocks that fill the GPU (a few per SM); `max_splits`: kMaxReduceSplits for
// reductions (partials merged per segment), kMaxApplySplits for elementwise passes.
inline LaunchShape plan_planar(const WalkGeometry& g, int V, int64_t target_blocks, int64_t max_splits) {
  LaunchShape s;
  const int64_t items = g.N * (g.L / V);  // per segment
  // A block never has more threads than its segment has items (rounded up to whole warps).
  s.block_x = int(std::min<int64_t>(kMaxBlockThreads, ceil_div(items, kWarpSize) * kWarpSize));
  const int64_t useful_splits = ceil_div(items, int64_t(s.block_x) * kMinItemsPerThread);
  s.splits = std::clamp<int64_t>(ceil_div(target_blocks, g.segments()), 1,
                                 std::max<int64_t>(1, std::min(useful_splits, max_splits)));
  s.grid_x = std::min(g.segments(), kMaxGridX);
  s.grid_y = s.splits;
  return s;
}

inline LaunchShape plan_interleaved(const WalkGeometry& g, int V, int64_t target_blocks, int64_t max_splits) {
  LaunchShape s;
  const int64_t packs = g.C / V;          // channel packs per position
  const int64_t positions = g.N * g.L;    // per piece
  int bx = 1;                             // lanes over channel packs: a power of two <= 32
  while (bx < kWarpSize && bx < packs) bx *= 2;
  int by = kWarpSize / bx;                // rows over positions: whole warps, at most 256 threads
  while (bx * by < kMaxBlockThreads && by < positions) by *= 2;
  s.block_x = bx;
  s.block_y = by;
  const int64_t tiles = ceil_div(packs, bx);
  const int64_t useful_splits = ceil_div(positions, int64_t(by) * kMinItemsPerThread);
  s.splits = std::clamp<int64_t>(ceil_div(target_blocks, tiles * g.P), 1,
                                 std::max<int64_t>(1, std::min(useful_splits, max_splits)));
  s.grid_x = std::min(tiles, kMaxGridX);
  s.grid_y = s.splits;
  s.grid_z = std::min(g.P, kMaxGridYZ);
  return s;
}

}  // namespace stochnorm_ext::cuda
