// How the CPU passes share their work among threads: the block and grain sizes, the planar
// split (segments, blocks of rows, chunks of a segment: PlanarSplit), the interleaved split
// (contiguous chunks of rows, blocks within a piece: InterleavedSplit), and the per-piece
// copy of an interleaved table (PieceTable). Every split is a fixed function of the geometry
// and the thread count, and partial results are merged in chunk order, so a result does not
// depend on which thread ran which chunk.
//
// Compiled once per CPU capability, as part of segment_kernels.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "segment_core.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including work_split.h (see segment_kernels.h)"
#endif

namespace stochnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

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

}  // namespace CPU_CAPABILITY
}  // namespace stochnorm_ext::cpu
