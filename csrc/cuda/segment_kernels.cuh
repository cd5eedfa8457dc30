// The CUDA kernels of the shared core: one kernel per (pass, layout), each a thin shell around
// the per-thread functions of segment_walk.h, plus the block reduction (warp shuffles, then one
// slot per warp in shared memory) and the kernels that merge a segment's split partials.
//
// Reductions (stats, grad sums) run in two steps so that small C and small batches still fill
// every SM: the values of one segment are shared by `splits` blocks (grid y); each block writes
// one partial per segment to a staging buffer [split][segment]; a second kernel, one block per
// segment, merges the partials in a fixed order (deterministic; no atomics). With one split the
// first kernel writes the final table directly and the second is not launched.
//
// Every kernel takes part in its block reduction with every thread (threads without items
// contribute an empty state), so the shuffles always run with a full warp mask.
#pragma once

#include <cuda_runtime.h>

#include "segment_walk.h"

namespace stochnorm_ext::cuda {

// ------------------------------------------------------------------------------ shuffles
template <typename T, int V>
__device__ __forceinline__ Moments<T, V> shfl_xor(const Moments<T, V>& s, int offset) {
  Moments<T, V> r;
  r.count = __shfl_xor_sync(0xffffffffu, s.count, offset);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    r.mean[k] = __shfl_xor_sync(0xffffffffu, s.mean[k], offset);
    r.m2[k] = __shfl_xor_sync(0xffffffffu, s.m2[k], offset);
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ Sums<T, V> shfl_xor(const Sums<T, V>& s, int offset) {
  Sums<T, V> r;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    r.dy[k] = __shfl_xor_sync(0xffffffffu, s.dy[k], offset);
    r.dy_xc[k] = __shfl_xor_sync(0xffffffffu, s.dy_xc[k], offset);
  }
  return r;
}

// Reduces the states of a block of blockDim.x * blockDim.y threads (a multiple of 32, at most
// kMaxBlockThreads) column by column: with lanes_x = blockDim.x (a power of two <= 32), threads
// of equal threadIdx.x are merged. Returns the total of column t in the thread of linear index
// t < lanes_x (threadIdx.y == 0); other threads get a partial state. Warps are merged in a
// fixed order. Ends with a barrier, so it can be called again (e.g. in a loop over segments).
template <typename State>
__device__ State block_reduce(State s, int lanes_x) {
  __shared__ State warp_totals[kMaxBlockThreads / kWarpSize][kWarpSize];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int warps = (blockDim.x * blockDim.y) / kWarpSize;
  // Lanes lane and lane ^ offset hold the same column when offset is a multiple of lanes_x.
  for (int offset = kWarpSize / 2; offset >= lanes_x; offset /= 2) s.merge(shfl_xor(s, offset));
  if (lane < lanes_x) warp_totals[warp][lane] = s;
  __syncthreads();
  if (tid < lanes_x) {
    s = warp_totals[0][tid];
    for (int w = 1; w < warps; ++w) s.merge(warp_totals[w][tid]);
  }
  __syncthreads();
  return s;
}

// ------------------------------------------------------------------------------ block work
// The (segment, first item, stride) arguments of segment_walk.h's thread functions, from the
// launch shapes of plan_planar / plan_interleaved. Every thread of a block takes part in every
// call of f (the reductions' block_reduce needs all of them), with or without items.

// Planar grid (segments, splits): f(r, first, stride) for each segment r of this block.
template <typename F>
__device__ __forceinline__ void for_each_planar_segment(const WalkGeometry& g, const F& f) {
  const int64_t first = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t r = blockIdx.x; r < g.segments(); r += gridDim.x) f(r, first, stride);
}

// Interleaved grid (channel-pack tiles, splits, pieces): f(cv, p, first, stride) for each
// (piece p, tile) of this block, cv the thread's channel pack (maybe past the channels).
template <int V, typename F>
__device__ __forceinline__ void for_each_interleaved_tile(const WalkGeometry& g, const F& f) {
  const int64_t tiles = ceil_div(g.C / V, blockDim.x);
  const int64_t first = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t p = blockIdx.z; p < g.P; p += gridDim.z) {
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) f(tile * blockDim.x + threadIdx.x, p, first, stride);
  }
}

// ------------------------------------------------------------------------------ statistics
// The pass also counts the step: one thread of the launch increments step_count (no other
// thread of the pass reads it; the coefficient step after it reads the new count).
// Single split (part_count == nullptr): the final mean (shift added back, in double) and m2
// go to the double tables mean[segment], m2[segment]. Several splits: partials of the shifted
// values go to part_*[split * segments + segment] and the blocks of split 0 write each
// segment's shift to part_shift[segment], which merge_stats_kernel adds back.
template <typename acc_t>
struct StatsOut {
  int64_t* step_count;  // num_batches_tracked (+= 1 by one thread of the pass), or nullptr
  acc_t* part_count;
  acc_t* part_mean;
  acc_t* part_m2;
  acc_t* part_shift;
  double* mean;
  double* m2;

  __device__ __forceinline__ void store(int64_t split, int64_t segments, int64_t segment, acc_t shift,
                                        acc_t count, acc_t mean_shifted, acc_t m2_value) const {
    if (part_count == nullptr) {
      mean[segment] = double(shift) + double(mean_shifted);
      m2[segment] = double(m2_value);
      return;
    }
    const int64_t i = split * segments + segment;
    part_count[i] = count;
    part_mean[i] = mean_shifted;
    part_m2[i] = m2_value;
    if (split == 0) part_shift[segment] = shift;
  }

  __device__ __forceinline__ void count_step() const {
    if (step_count != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0 &&
        threadIdx.y == 0) {
      *step_count += 1;
    }
  }
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    planar_stats_kernel(WalkGeometry g, const scalar_t* __restrict__ x, StatsOut<acc_type<scalar_t>> out) {
  out.count_step();
  const int64_t segments = g.segments();
  for_each_planar_segment(g, [&](int64_t r, int64_t first, int64_t stride) {
    auto m = planar_thread_stats<scalar_t, V>(g, x, r, first, stride);
    m = block_reduce(m, 1);
    if (threadIdx.x == 0) out.store(blockIdx.y, segments, r, planar_shift(g, x, r), m.count, m.mean[0], m.m2[0]);
  });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    interleaved_stats_kernel(WalkGeometry g, const scalar_t* __restrict__ x, StatsOut<acc_type<scalar_t>> out) {
  out.count_step();
  const int64_t segments = g.segments();
  for_each_interleaved_tile<V>(g, [&](int64_t cv, int64_t p, int64_t first, int64_t stride) {
    auto m = interleaved_thread_stats<scalar_t, V>(g, x, cv, p, first, stride);
    m = block_reduce(m, blockDim.x);
    if (threadIdx.y == 0 && cv * V < g.C) {
      for (int k = 0; k < V; ++k) {
        out.store(blockIdx.y, segments, interleaved_segment(g, cv, p, k, V), interleaved_shift(g, x, cv, p, k, V),
                  m.count, m.mean[k], m.m2[k]);
      }
    }
  });
}

// One block per segment merges its `splits` partials (thread t takes splits t, t + blockDim.x, ...)
// and adds the segment's shift back to the mean, in double.
template <typename acc_t>
__global__ void __launch_bounds__(kMaxBlockThreads)
    merge_stats_kernel(int64_t segments, int64_t splits, const acc_t* __restrict__ part_count,
                       const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                       const acc_t* __restrict__ shift, double* __restrict__ mean, double* __restrict__ m2) {
  for (int64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    Moments<acc_t, 1> m;
    m.reset();
    for (int64_t k = threadIdx.x; k < splits; k += blockDim.x) {
      Moments<acc_t, 1> b;
      b.count = part_count[k * segments + s];
      b.mean[0] = part_mean[k * segments + s];
      b.m2[0] = part_m2[k * segments + s];
      m.merge(b);
    }
    m = block_reduce(m, 1);
    if (threadIdx.x == 0) {
      mean[s] = double(shift[s]) + double(m.mean[0]);
      m2[s] = double(m.m2[0]);
    }
  }
}

// ------------------------------------------------------------------------------ gradient sums
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    planar_grad_sums_kernel(WalkGeometry g, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                            coefficients::CenterTable<acc_type<scalar_t>> center, acc_type<scalar_t>* __restrict__ out_dy,
                            acc_type<scalar_t>* __restrict__ out_dy_xc) {
  const int64_t segments = g.segments();
  for_each_planar_segment(g, [&](int64_t r, int64_t first, int64_t stride) {
    auto s = planar_thread_grad_sums<scalar_t, V>(g, dy, x, center[r], r, first, stride);
    s = block_reduce(s, 1);
    if (threadIdx.x == 0) {
      const int64_t i = int64_t(blockIdx.y) * segments + r;
      out_dy[i] = s.dy[0];
      out_dy_xc[i] = s.dy_xc[0];
    }
  });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    interleaved_grad_sums_kernel(WalkGeometry g, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                 coefficients::CenterTable<acc_type<scalar_t>> center,
                                 acc_type<scalar_t>* __restrict__ out_dy, acc_type<scalar_t>* __restrict__ out_dy_xc) {
  const int64_t segments = g.segments();
  for_each_interleaved_tile<V>(g, [&](int64_t cv, int64_t p, int64_t first, int64_t stride) {
    auto s = interleaved_thread_grad_sums<scalar_t, V>(g, dy, x, center, cv, p, first, stride);
    s = block_reduce(s, blockDim.x);
    if (threadIdx.y == 0 && cv * V < g.C) {
      for (int k = 0; k < V; ++k) {
        const int64_t i = int64_t(blockIdx.y) * segments + interleaved_segment(g, cv, p, k, V);
        out_dy[i] = s.dy[k];
        out_dy_xc[i] = s.dy_xc[k];
      }
    }
  });
}

template <typename acc_t>
__global__ void __launch_bounds__(kMaxBlockThreads)
    merge_sums_kernel(int64_t segments, int64_t splits, const acc_t* __restrict__ part_dy,
                      const acc_t* __restrict__ part_dy_xc, acc_t* __restrict__ sum_dy,
                      acc_t* __restrict__ sum_dy_xc) {
  for (int64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    Sums<acc_t, 1> t;
    t.reset();
    for (int64_t k = threadIdx.x; k < splits; k += blockDim.x) {
      t.dy[0] += part_dy[k * segments + s];
      t.dy_xc[0] += part_dy_xc[k * segments + s];
    }
    t = block_reduce(t, 1);
    if (threadIdx.x == 0) {
      sum_dy[s] = t.dy[0];
      sum_dy_xc[s] = t.dy_xc[0];
    }
  }
}

// ------------------------------------------------------------------------------ elementwise passes
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    planar_apply_kernel(WalkGeometry g, const scalar_t* __restrict__ x,
                        coefficients::ApplyTables<acc_type<scalar_t>> tables, scalar_t* __restrict__ y) {
  for_each_planar_segment(g, [&](int64_t r, int64_t first, int64_t stride) {
    acc_type<scalar_t> center, scale, shift;
    tables.at(r, center, scale, shift);
    planar_thread_apply<scalar_t, V>(g, x, y, center, scale, shift, r, first, stride);
  });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    interleaved_apply_kernel(WalkGeometry g, const scalar_t* __restrict__ x,
                             coefficients::ApplyTables<acc_type<scalar_t>> tables, scalar_t* __restrict__ y) {
  for_each_interleaved_tile<V>(g, [&](int64_t cv, int64_t p, int64_t first, int64_t stride) {
    interleaved_thread_apply<scalar_t, V>(g, x, y, tables, cv, p, first, stride);
  });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    planar_grad_apply_kernel(WalkGeometry g, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                             coefficients::CenterTable<acc_type<scalar_t>> center,
                             const acc_type<scalar_t>* __restrict__ k_dy,
                             const acc_type<scalar_t>* __restrict__ k_x, const acc_type<scalar_t>* __restrict__ k_0,
                             scalar_t* __restrict__ dx) {
  for_each_planar_segment(g, [&](int64_t r, int64_t first, int64_t stride) {
    planar_thread_grad_apply<scalar_t, V>(g, dy, x, dx, center[r], k_dy[r], k_x[r], k_0[r], r, first, stride);
  });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxBlockThreads)
    interleaved_grad_apply_kernel(WalkGeometry g, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  coefficients::CenterTable<acc_type<scalar_t>> center,
                                  const acc_type<scalar_t>* __restrict__ k_dy,
                                  const acc_type<scalar_t>* __restrict__ k_x,
                                  const acc_type<scalar_t>* __restrict__ k_0, scalar_t* __restrict__ dx) {
  for_each_interleaved_tile<V>(g, [&](int64_t cv, int64_t p, int64_t first, int64_t stride) {
    interleaved_thread_grad_apply<scalar_t, V>(g, dy, x, dx, center, k_dy, k_x, k_0, cv, p, first, stride);
  });
}

}  // namespace stochnorm_ext::cuda
