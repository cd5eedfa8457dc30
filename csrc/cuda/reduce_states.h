// What a CUDA thread accumulates in the two reductions, and how two such states merge: the
// statistics' moments (Moments, merged with welford::chan_merge of csrc/welford.h, the one
// Chan merge of the library), the gradient sums (Sums), and the per-thread Welford
// accumulators with exact integer counts (LaneWelford: one statistic per lane; PackWelford:
// one statistic fed a pack at a time). The kernels' block reductions (segment_kernels.cuh)
// and the host replay (tests/walk_check.cpp) merge these states; segment_walk.h fills them.
//
// Plain C10_HOST_DEVICE code with nothing CUDA-only.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "../welford.h"

namespace stochnorm_ext::cuda {

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
// of one row): each pack's own mean and m2 (two passes in registers), folded in with
// welford::chan_merge, an exact integer count.
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
    T merged_count = T(count);  // the weights in T; the count itself stays an exact integer
    welford::chan_merge(merged_count, mean, m2, T(V), pack_mean, pack_m2);
    count += V;
  }
  C10_HOST_DEVICE Moments<T, 1> moments() const {
    Moments<T, 1> m;
    m.count = T(count);
    m.mean[0] = mean;
    m.m2[0] = m2;
    return m;
  }
};

}  // namespace stochnorm_ext::cuda
