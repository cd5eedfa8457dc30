// The shared CUDA core at tensor level: the four memory-bound passes over segments,
// used by the three layers (register_cuda.cu) and registered as the stochnorm_ext::segment_* ops.
//
//   stats       x              -> mean, m2 per segment          (m2 = sum of squared deviations)
//   apply       x, tables      -> y  = (x - center) * scale + shift
//   grad_sums   dy, x, center  -> sum dy, sum dy * (x - center) per segment
//   grad_apply  dy, x, tables  -> dx = k_dy * dy + k_x * (x - center) + k_0
//
// Tables are in the accumulation type (float; double for double input): the apply's and the
// centres per statistic, read per segment by the kernels (coefficients.h: ApplyTables,
// CenterTable), the backward apply's coefficients (C, P); the statistics (mean, m2) are
// double for every input (common::stats_table_options). Inputs are
// SegmentInputs (csrc/common.h): x dense in its output format and the geometry to walk it.
// Every function runs on x's device (the caller holds a CUDAGuard) and the current stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "../common.h"
#include "segment_walk.h"

namespace stochnorm_ext::cuda {

using common::SegmentInput;

// The Device passes of csrc/ops_impl.h (what they take: there), over tables the ops have checked.
std::tuple<at::Tensor, at::Tensor> segment_stats(const SegmentInput& in, const at::Tensor& step_count);
at::Tensor segment_apply(const SegmentInput& in, const common::ApplyArgs& args);
std::tuple<at::Tensor, at::Tensor> segment_grad_sums(const at::Tensor& grad_output, const SegmentInput& in,
                                                     const at::Tensor& center, int64_t segments_per_stat);
at::Tensor segment_grad_apply(const at::Tensor& grad_output, const SegmentInput& in, const at::Tensor& center,
                              int64_t segments_per_stat, const at::Tensor& k_dy, const at::Tensor& k_x,
                              const at::Tensor& k_0);

// ------------------------------------------------------------------------------ launch helpers
// Shared by segment_reduce.cu and segment_apply.cu.

inline WalkGeometry walk_geometry(const common::SegmentGeometry& g) { return WalkGeometry{g.N, g.C, g.P, g.L}; }

// Blocks that fill the current GPU: 8 resident blocks of 256 threads per SM (2048 threads).
inline int64_t target_blocks() {
  return int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Whether the 16-byte packs can be used: the dimension they run along (L in the planar layout,
// C in the interleaved one) holds whole packs, and every base pointer is 16-byte aligned (a
// tensor with a storage offset may not be). Otherwise the kernels read one value at a time.
template <typename scalar_t>
bool use_packs(const common::SegmentGeometry& g, std::initializer_list<const void*> pointers) {
  const int64_t along = g.interleaved ? g.C : g.L;
  if (along % kPackWidth<scalar_t> != 0) return false;
  for (const void* p : pointers) {
    if (!aligned16(p)) return false;
  }
  return true;
}

inline dim3 grid_of(const LaunchShape& s) {
  return dim3(static_cast<unsigned>(s.grid_x), static_cast<unsigned>(s.grid_y), static_cast<unsigned>(s.grid_z));
}

inline dim3 block_of(const LaunchShape& s) {
  return dim3(static_cast<unsigned>(s.block_x), static_cast<unsigned>(s.block_y), 1u);
}

inline LaunchShape plan(const common::SegmentGeometry& g, int V, int64_t max_splits) {
  const WalkGeometry w = walk_geometry(g);
  return g.interleaved ? plan_interleaved(w, V, target_blocks(), max_splits)
                       : plan_planar(w, V, target_blocks(), max_splits);
}

// The kernels need at least one value per segment (callers return early for empty inputs).
inline void check_geometry(const common::SegmentGeometry& g) {
  TORCH_CHECK(g.N >= 1 && g.C >= 1 && g.P >= 1 && g.L >= 1, "stochnorm_ext (CUDA): empty geometry");
}

#define STOCHNORM_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace stochnorm_ext::cuda
