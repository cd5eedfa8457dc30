// The one Welford / Chan toolkit of the library, shared by the CPU kernels
// (cpu/segment_kernels.h, cpu/row_kernels.h), the CUDA kernels' reduction states
// (cuda/reduce_states.h) and the coefficient steps (coefficients.h): moments (count, mean, m2)
// of a set of values, m2 the sum of squared deviations from the mean, and Chan et al.'s
// parallel merge of two such sets. Every merge of moments in csrc/ goes through chan_merge.
#pragma once

#include <c10/macros/Macros.h>

namespace stochnorm_ext::welford {

// Fold the moments (count_b, mean_b, m2_b) of another set of values into (count, mean, m2).
// An empty set (count_b == 0) changes nothing; merging into an empty set copies the other
// outright: the formula would give the same finite values, but on an overflowing set
// (|mean| > sqrt(max), e.g. float32 values of 1e20) its delta * delta * 0 is inf * 0 = NaN,
// where BatchNorm gives an inf variance.
template <typename T>
C10_HOST_DEVICE inline void chan_merge(T& count, T& mean, T& m2, T count_b, T mean_b, T m2_b) {
  if (count_b == T(0)) return;
  if (count == T(0)) {
    count = count_b;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const T total = count + count_b;
  const T delta = mean_b - mean;
  mean += delta * (count_b / total);
  m2 += m2_b + delta * delta * (count * count_b / total);
  count = total;
}

// The moments as one value, for reductions that combine partial results (a CPU loop, a CUDA
// block reduction): Moments{} is the empty set, combine() and merge() are chan_merge.
template <typename T>
struct Moments {
  T count = T(0);
  T mean = T(0);
  T m2 = T(0);

  C10_HOST_DEVICE void merge(T count_b, T mean_b, T m2_b) { chan_merge(count, mean, m2, count_b, mean_b, m2_b); }

  C10_HOST_DEVICE static Moments combine(Moments a, const Moments& b) {
    chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2);
    return a;
  }
};

}  // namespace stochnorm_ext::welford
