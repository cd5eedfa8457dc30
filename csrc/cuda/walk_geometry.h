// How a CUDA launch covers the geometry of a segment walk: the launch-size constants, the
// walked geometry as plain data (WalkGeometry), 16-byte packs, the lattice of a thread's items
// and the loop that visits them (LatticeCursor, walk_items), the element offset of an item in
// each layout, and the launch shapes (plan_planar, plan_interleaved). What the layouts are is
// described once, at SegmentGeometry in csrc/common.h; this file only says how blocks and
// threads split them. What a thread computes on its items is in segment_walk.h.
//
// Plain C10_HOST_DEVICE code with nothing CUDA-only, like segment_walk.h, so that
// csrc/cuda/tests/walk_check.cpp can replay every (block, thread) of a launch on the host.
//
// How blocks take the layouts (N samples, C channels, P pieces, L values per (sample,
// segment), segment s = c * P + p):
//   planar       a block owns one segment r (one row in every sample) and a share ("split")
//                of its N * L values, walked in memory order V values (one 16-byte pack) at
//                a time when L % V == 0.
//   interleaved  a block owns a tile of bx channel packs of one piece p and a split of the
//                N * L positions; lane tx reads V adjacent channels of a position, rows ty
//                walk positions. Reductions run across positions (ty).
// A block's work is a lattice: item i of its segment has coordinates (outer, inner) =
// (i / inner_size, i % inner_size) and thread t visits items first, first + stride, ...; the
// LatticeCursor steps through them without a division in the loop. All indices are int64.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

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

// ------------------------------------------------------------------------------ item offsets
// planar: segment r = row r of every sample; item (n, i) is the pack at element
// (n * R + r) * L + i * V.
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


// interleaved: channel pack cv (channels cv * V .. cv * V + V - 1) of piece p; item (n, l) is
// the pack at element ((n * P + p) * L + l) * C + cv * V. A thread whose pack lies past the
// channels has no items (it still takes part in its block's reduction).
C10_HOST_DEVICE inline int64_t interleaved_offset(const WalkGeometry& g, int64_t cv, int64_t p, int64_t n, int64_t l,
                                                  int V) {
  return ((n * g.P + p) * g.L + l) * g.C + cv * V;
}

// Table entry (segment) of lane k of channel pack cv in piece p.
C10_HOST_DEVICE inline int64_t interleaved_segment(const WalkGeometry& g, int64_t cv, int64_t p, int k, int V) {
  return (cv * V + k) * g.P + p;
}

// Item (n, l) of channel pack cv in piece p, as walk_items takes it.
template <int V>
struct InterleavedOffset {
  const WalkGeometry& g;
  int64_t cv, p;
  C10_HOST_DEVICE int64_t operator()(int64_t n, int64_t l) const { return interleaved_offset(g, cv, p, n, l, V); }
};

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
