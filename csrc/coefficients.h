// The small per-statistic math between the big passes: ONE coefficient step per op.
//
// Every layer is "stats pass -> coefficient step" (the statistics ops) then the apply pass
// (norm_apply, which reads the per-statistic tables itself: ApplyTables); the one backward is
// "sums pass -> coefficient step -> apply pass" (norm_backward). The passes are shared kernels
// over segments (segment s = c * P + p: piece p of channel c's flattened positions;
// docs/DESIGN.md); this header holds the rest.
//
// Statistics (docs/SPEC.md, grouping rule): num_stats G = C per channel (StochNorm, CBN, BGN
// with G == C); G | C: statistic g covers the segments (= channels, P = 1) g*spg .. (g+1)*spg-1;
// G = P * C: statistic s is segment s. So statistic of segment s = s / spg (spg = segments per
// statistic), channel of segment s = s / P.
//
// Header-only and C10_HOST_DEVICE so that the CPU (a loop) and CUDA (one thread per index, or
// one block per unit with a block reduction) run the same formulas. Two kinds of step:
//  - index steps: Step()(i, args) for every index i (Device::for_each_index);
//  - unit steps: units of `members` members; partial(u, m, args) of every member, combined
//    into one total per unit (Partial::combine), then finish(u, m, total, args) for every
//    member (Device::for_each_unit). No member loops serially over a unit on one GPU thread.
// T is the accumulation type (float, or double for double input); null weight / bias pointers
// mean gamma = 1 / beta = 0.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "welford.h"

namespace stochnorm_ext::coefficients {

template <typename T>
C10_HOST_DEVICE inline T weight_or_one(const T* weight, int64_t c) {
  return weight != nullptr ? weight[c] : T(1);
}

template <typename T>
C10_HOST_DEVICE inline T bias_or_zero(const T* bias, int64_t c) {
  return bias != nullptr ? bias[c] : T(0);
}

template <typename T>
C10_HOST_DEVICE inline T inverse_std(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}

// ------------------------------------------------------------------ the running statistics
// BatchNorm's EMA, done in place by the statistics step (one thread per statistic reads its
// entries before writing them): f = momentum, or 1 / num_batches_tracked when momentum is
// None (read from the tensor, already incremented by this call's stats pass: no host sync);
// rm = (1 - f) rm + f mean, rv = (1 - f) rv + f var * M / (M - 1).
template <typename T>
struct RunningUpdate {
  T* running_mean;            // (num_stats,) or nullptr: no update
  T* running_var;
  T momentum;                 // used when step_count is nullptr
  const int64_t* step_count;  // num_batches_tracked when momentum is None, else nullptr
  T unbiased;                 // M / (M - 1)
};

template <typename T>
C10_HOST_DEVICE inline void update_running(int64_t s, const RunningUpdate<T>& u, T mean, T var) {
  if (u.running_mean == nullptr) return;
  const T f = u.step_count != nullptr ? T(1) / T(*u.step_count) : u.momentum;
  u.running_mean[s] = (T(1) - f) * u.running_mean[s] + f * mean;
  u.running_var[s] = (T(1) - f) * u.running_var[s] + f * (var * u.unbiased);
}

// What every statistics step writes per statistic: the centre and variance norm_apply uses and
// the reduction weight red (1/M for batch statistics, 0 for constants) norm_backward uses.
template <typename T>
struct StatsOut {
  T* center;
  T* var;
  T* red;
};

// ------------------------------------------------------------------ StochNorm (index step, C)
// mask[c]: this batch's statistics; else the running statistics as they were before this
// call's update (read before the same thread writes them).
template <typename T>
struct StochNormStats {
  const double* seg_mean;     // (C,) float64 segment statistics
  const double* seg_m2;
  T count;                    // M = N * S
  const bool* mask;           // (C,)
  const T* running_mean;      // (C,) the same memory as update.running_mean when updating
  const T* running_var;
  RunningUpdate<T> update;
  StatsOut<T> out;
};

struct StochNormStatsStep {
  template <typename T>
  C10_HOST_DEVICE void operator()(int64_t c, const StochNormStats<T>& a) const {
    const T mean = T(a.seg_mean[c]), var = T(a.seg_m2[c] / double(a.count));
    const bool batch = a.mask[c];
    a.out.center[c] = batch ? mean : a.running_mean[c];
    a.out.var[c] = batch ? var : a.running_var[c];
    a.out.red[c] = batch ? T(1) / a.count : T(0);
    update_running(c, a.update, mean, var);
  }
};

// ------------------------------------------------------------------ CBN (index step, C)
// The current batch's (mu_t, var_t) pooled with the kept compensated past entries, count_c =
// 1 + kept entries, exactly as reference.pool_window:
//     mu  = (mu_t + sum mu') / count_c
//     var = (var_t + sum var' + spread) / count_c,  spread = sum over entries of (mu_e - mu)^2
// red = 1 / (count_c * M): the past entries are constants. The running statistics follow
// the current batch.
template <typename T>
struct CrossIterationStats {
  const double* seg_mean;     // (C,)
  const double* seg_m2;
  T count;                    // M = N * S
  int64_t channels;           // C, the row stride of the past tables
  int64_t past_entries;       // K
  const T* past_mean;         // (K, C)
  const T* past_var;
  const bool* past_keep;      // (K, C)
  T* mu_t;                    // (C,) the current batch's statistics (what the window stores)
  T* var_t;
  RunningUpdate<T> update;
  StatsOut<T> out;
};

struct CrossIterationStatsStep {
  template <typename T>
  C10_HOST_DEVICE void operator()(int64_t c, const CrossIterationStats<T>& a) const {
    const T mu_t = T(a.seg_mean[c]), var_t = T(a.seg_m2[c] / double(a.count));
    T entries = 1, sum_mean = mu_t, sum_var = var_t;
    for (int64_t k = 0; k < a.past_entries; ++k) {
      const int64_t i = k * a.channels + c;
      if (a.past_keep[i]) {
        entries += T(1);
        sum_mean += a.past_mean[i];
        sum_var += a.past_var[i];
      }
    }
    const T mean = sum_mean / entries;
    T spread = (mu_t - mean) * (mu_t - mean);
    for (int64_t k = 0; k < a.past_entries; ++k) {
      const int64_t i = k * a.channels + c;
      if (a.past_keep[i]) spread += (a.past_mean[i] - mean) * (a.past_mean[i] - mean);
    }
    a.mu_t[c] = mu_t;
    a.var_t[c] = var_t;
    a.out.center[c] = mean;
    a.out.var[c] = (sum_var + spread) / entries;
    a.out.red[c] = T(1) / (entries * a.count);
    update_running(c, a.update, mu_t, var_t);
  }
};

// ------------------------------------------------------------------ BGN (unit step)
// Unit g = statistic, members = its spg segments (equal counts): their float64 moments
// Chan-merged (float segment means near a large common offset would lose the spread between
// them), then member 0 writes the statistic's entries and its running update.
template <typename T>
struct BatchGroupNormStats {
  int64_t segments_per_stat;  // spg
  const double* seg_mean;     // (C*P,)
  const double* seg_m2;
  double seg_count;           // values per segment, N * S / P
  T count;                    // M = values per statistic
  RunningUpdate<T> update;
  StatsOut<T> out;
};

struct BatchGroupNormStatsStep {
  using Partial = welford::Moments<double>;

  template <typename T>
  C10_HOST_DEVICE Partial partial(int64_t g, int64_t m, const BatchGroupNormStats<T>& a) const {
    const int64_t s = g * a.segments_per_stat + m;
    return Partial{a.seg_count, a.seg_mean[s], a.seg_m2[s]};
  }

  template <typename T>
  C10_HOST_DEVICE void finish(int64_t g, int64_t m, const Partial& total, const BatchGroupNormStats<T>& a) const {
    if (m != 0) return;
    const T mean = T(total.mean), var = T(total.m2 / total.count);
    a.out.center[g] = mean;
    a.out.var[g] = var;
    a.out.red[g] = T(1) / a.count;
    update_running(g, a.update, mean, var);
  }
};

// ------------------------------------------------------------------ what the passes read
// The apply and backward passes read their per-segment coefficients from the per-statistic
// tables themselves (no tables step between a coefficient step and a pass): segment s has
// statistic g = s / spg and channel c = s / P.

// The centre of segment s, as the sums and apply passes subtract it.
template <typename T>
struct CenterTable {
  const T* center;            // (G,)
  int64_t segments_per_stat;  // spg; 1: one entry per segment

  C10_HOST_DEVICE T operator[](int64_t s) const { return center[s / segments_per_stat]; }
};

// The apply pass y = (x - center) * scale + shift: center = center[g],
// scale = weight[c] * rsqrt(var[g] + eps), shift = bias[c]. Without var, scale = weight[c]: the
// per-segment tables of the segment_apply op (spg = P = 1: one entry per segment).
template <typename T>
struct ApplyTables {
  int64_t segments_per_stat;  // spg
  int64_t pieces;             // P
  const T* center;            // (G,)
  const T* var;               // (G,) or nullptr
  const T* weight;            // (C,) or nullptr
  const T* bias;
  T eps;

  C10_HOST_DEVICE void at(int64_t s, T& center_s, T& scale_s, T& shift_s) const {
    const int64_t g = s / segments_per_stat, c = s / pieces;
    center_s = center[g];
    scale_s = var != nullptr ? weight_or_one(weight, c) * inverse_std(var[g], eps) : weight_or_one(weight, c);
    shift_s = bias_or_zero(bias, c);
  }
};

// ------------------------------------------------------------------ norm_backward (unit step)
// The one layer-agnostic backward, in reduction-weight form. Per statistic s with
// A_s = sum of gamma_c * dy and B_s = sum of gamma_c * dy * (x - center_s) over its values,
// invstd_s = rsqrt(var_s + eps):
//     dx = gamma_c * invstd_s * dy + k_x_s * (x - center_s) + k_0_s,
//     k_x_s = -invstd_s^3 * red_s * B_s,   k_0_s = -invstd_s * red_s * A_s   (red None: 0)
//     grad_weight_c = sum over c's values of dy * (x - center_s) * invstd_s, grad_bias_c = sum dy.
// red carries how the statistics depend on x (1/M for BN and BGN, 1/(count_c M) for CBN, 0 for
// constants); nothing here assumes x_hat averages to zero (it does not for CBN).
// Units: P == 1 (G | C): unit = statistic, members = its channels, the total is (A, B);
//        P > 1 (G = P*C): unit = channel, members = its pieces (one statistic each), the
//        total is (grad_weight_c, grad_bias_c).
template <typename T>
struct NormBackward {
  int64_t segments_per_stat;  // spg (1 when P > 1)
  int64_t pieces;             // P
  const T* sum_dy;            // (C*P,) per segment, or nullptr (no sums pass: zeros)
  const T* sum_dy_xc;         // (C*P,) sum of dy * (x - center of the segment's statistic)
  const T* weight;            // (C,) or nullptr
  const T* var;               // (G,)
  const T* red;               // (G,) or nullptr (constant statistics)
  T eps;
  T* k_dy;                    // (C*P,) apply tables, or nullptr (no grad_input)
  T* k_x;
  T* k_0;
  T* grad_weight;             // (C,) or nullptr
  T* grad_bias;
};

template <typename T>
struct SumPair {
  T a = T(0);
  T b = T(0);
  C10_HOST_DEVICE static SumPair combine(SumPair x, const SumPair& y) {
    x.a += y.a;
    x.b += y.b;
    return x;
  }
};

template <typename T>
C10_HOST_DEVICE inline T sum_or_zero(const T* sums, int64_t s) {
  return sums != nullptr ? sums[s] : T(0);
}

template <typename T>
struct NormBackwardStep {
  using Partial = SumPair<T>;

  C10_HOST_DEVICE static int64_t segment(int64_t u, int64_t m, const NormBackward<T>& a) {
    return a.pieces > 1 ? u * a.pieces + m : u * a.segments_per_stat + m;
  }

  C10_HOST_DEVICE Partial partial(int64_t u, int64_t m, const NormBackward<T>& a) const {
    const int64_t s = segment(u, m, a), g = s / a.segments_per_stat;
    const T dy = sum_or_zero(a.sum_dy, s), dy_xc = sum_or_zero(a.sum_dy_xc, s);
    if (a.pieces > 1) return Partial{dy_xc * inverse_std(a.var[g], a.eps), dy};  // channel u's parameter grads
    const T gamma = weight_or_one(a.weight, s);                                    // statistic u's A, B
    return Partial{gamma * dy, gamma * dy_xc};
  }

  C10_HOST_DEVICE void finish(int64_t u, int64_t m, const Partial& total, const NormBackward<T>& a) const {
    const int64_t s = segment(u, m, a), g = s / a.segments_per_stat, c = s / a.pieces;
    const T r = inverse_std(a.var[g], a.eps);
    const T gamma = weight_or_one(a.weight, c);
    const T dy = sum_or_zero(a.sum_dy, s), dy_xc = sum_or_zero(a.sum_dy_xc, s);
    // The statistic's (A, B): the unit's total (P == 1), or this segment's own (P > 1).
    const T A = a.pieces > 1 ? gamma * dy : total.a, B = a.pieces > 1 ? gamma * dy_xc : total.b;
    const T red = a.red != nullptr ? a.red[g] : T(0);
    if (a.k_dy != nullptr) {
      a.k_dy[s] = gamma * r;
      a.k_x[s] = -r * r * r * red * B;
      a.k_0[s] = -r * red * A;
    }
    if (a.pieces > 1) {
      if (m == 0 && a.grad_weight != nullptr) a.grad_weight[c] = total.a;
      if (m == 0 && a.grad_bias != nullptr) a.grad_bias[c] = total.b;
    } else {
      if (a.grad_weight != nullptr) a.grad_weight[c] = dy_xc * r;
      if (a.grad_bias != nullptr) a.grad_bias[c] = dy;
    }
  }
};

}  // namespace stochnorm_ext::coefficients
