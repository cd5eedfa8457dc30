// The per-layer part of the three layers: tiny O(C) coefficient math between the big passes.
//
// Every layer is "stats pass -> coefficients -> apply pass" forward and "reduce pass ->
// coefficients -> apply pass" backward (docs/DESIGN.md). The big passes are shared kernels that
// work on per-segment tables (segment = the values one statistic covers inside one channel,
// indexed s = c * P + p for channel c and piece p); this header holds everything else.
//
// Header-only and C10_HOST_DEVICE so the CPU ops (a loop over the index) and a CUDA
// implementation (one thread per index) share the same formulas. Each "*_coefficients"
// function computes the entries of one index of its tables from raw pointers; a null
// weight/bias pointer means gamma = 1 / beta = 0. T is the accumulation type (float, or
// double for double input).
//
// The apply kernels take the centred form
//     forward:  y  = (x - center) * scale + shift
//     backward: dx = k_dy * dy + k_x * (x - center) + k_0
// so data with a large common offset stays accurate in float32.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace stochnorm_ext::coefficients {

// Chan et al.'s parallel update: fold the moments (count_b, mean_b, m2_b) of another set of
// values into (count, mean, m2); m2 is the sum of squared deviations from the mean.
template <typename T>
C10_HOST_DEVICE inline void chan_merge(T& count, T& mean, T& m2, T count_b, T mean_b, T m2_b) {
  if (count_b == T(0)) return;
  const T total = count + count_b;
  const T delta = mean_b - mean;
  mean += delta * (count_b / total);
  m2 += m2_b + delta * delta * (count * count_b / total);
  count = total;
}

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

// The backward of one normalisation y = gamma * (x - mu) * r + beta whose statistics (mu,
// var) depend on the input, r = 1 / sqrt(var + eps):
//     dx = r * (g - sum(g) / M - xhat * sum(g * xhat) / M),   g = gamma * dy, xhat = (x - mu) r
// with the sums over the values the statistics cover and M the count they are divided by
// (N*S for BN; N*S*C/G for a BGN group, whose channels have different gammas; count_c*N*S for
// CBN, whose statistics average count_c steps). Written as the two reduction terms of the
// centred backward apply, from sum_g = sum(gamma * dy) and sum_g_xc = sum(gamma * dy * (x - mu)):
//     k_x = -r^3 * sum_g_xc / M,   k_0 = -r * sum_g / M.
// Nothing here assumes xhat averages to zero over the batch (it does not for CBN).
template <typename T>
C10_HOST_DEVICE inline void reduction_terms(T invstd, T sum_g, T sum_g_xc, T count, T& k_x, T& k_0) {
  k_x = -invstd * invstd * invstd * sum_g_xc / count;
  k_0 = -invstd * sum_g / count;
}

// Channel c normalised with (mean, var) (StochNorm, CBN): the statistics it used and its
// apply coefficients. A: an argument struct with eps, weight, bias, center, invstd, scale, shift.
template <typename T, typename A>
C10_HOST_DEVICE inline void normalise_channel(int64_t c, T mean, T var, const A& a) {
  const T r = inverse_std(var, a.eps);
  a.center[c] = mean;
  a.invstd[c] = r;
  a.scale[c] = weight_or_one(a.weight, c) * r;
  a.shift[c] = bias_or_zero(a.bias, c);
}

// ---------------------------------------------------------------------------------- StochNorm
// Per channel c. Training (mask != nullptr): the batch branch (mask[c]) normalises with this
// batch's statistics, the moving branch with the running statistics as they were before this
// step (the caller updates them only after this call). Eval (mask == nullptr): every channel
// takes the running statistics and there are no batch statistics.
template <typename T>
struct StochNormForward {
  // inputs
  const bool* mask;           // (C,) or nullptr in eval
  const double* seg_mean;     // (C,) batch statistics (double: segment_stats); unused in eval
  const double* seg_m2;       // (C,)
  T count;                    // N * S values per channel
  const T* running_mean;      // (C,)
  const T* running_var;       // (C,)
  const T* weight;            // (C,) or nullptr
  const T* bias;              // (C,) or nullptr
  T eps;
  // outputs
  T* batch_mean;              // (C,) biased batch statistics, for the running update; unused in eval
  T* batch_var;
  T* center;                  // (C,) the statistics each channel was normalised with
  T* invstd;
  T* scale;                   // (C,) apply coefficients
  T* shift;
};

template <typename T>
C10_HOST_DEVICE inline void stoch_norm_forward_coefficients(int64_t c, const StochNormForward<T>& a) {
  bool batch_branch = false;
  if (a.mask != nullptr) {
    a.batch_mean[c] = T(a.seg_mean[c]);
    a.batch_var[c] = T(a.seg_m2[c] / double(a.count));
    batch_branch = a.mask[c];
  }
  const T mean = batch_branch ? a.batch_mean[c] : a.running_mean[c];
  const T var = batch_branch ? a.batch_var[c] : a.running_var[c];
  normalise_channel(c, mean, var, a);
}

// The backward of one channel normalised with y = gamma * (x - center) * invstd + beta
// (StochNorm, CBN): dx = gamma * r * dy, plus the reduction terms over `count` values when the
// channel's statistics came from this batch; gamma and beta get their gradients either way.
// The layers' argument structs extend this one with what decides `reduce` and `count`.
template <typename T>
struct ChannelBackward {
  const T* sum_dy;            // (C,) sum of dy
  const T* sum_dy_xc;         // (C,) sum of dy * (x - center)
  T count;                    // N * S
  const T* weight;
  const T* invstd;
  T* k_dy;
  T* k_x;
  T* k_0;
  T* grad_weight;
  T* grad_bias;
};

template <typename T>
C10_HOST_DEVICE inline void channel_backward(int64_t c, const ChannelBackward<T>& a, bool reduce, T count) {
  const T gamma = weight_or_one(a.weight, c);
  const T r = a.invstd[c];
  a.k_dy[c] = gamma * r;
  a.k_x[c] = T(0);
  a.k_0[c] = T(0);
  if (reduce) reduction_terms(r, gamma * a.sum_dy[c], gamma * a.sum_dy_xc[c], count, a.k_x[c], a.k_0[c]);
  a.grad_weight[c] = a.sum_dy_xc[c] * r;
  a.grad_bias[c] = a.sum_dy[c];
}

// Batch-branch channels get the ordinary BN gradient; moving-branch channels (and every
// channel in eval) use constant statistics, so dx = dy * gamma * r with no reduction terms.
// gamma and beta get their gradients from whichever branch the channel used.
template <typename T>
struct StochNormBackward : ChannelBackward<T> {
  const bool* mask;           // (C,) or nullptr in eval
};

template <typename T>
C10_HOST_DEVICE inline void stoch_norm_backward_coefficients(int64_t c, const StochNormBackward<T>& a) {
  channel_backward(c, a, a.mask != nullptr && a.mask[c], a.count);
}

// ---------------------------------------------------------------------------------- BGN
// Segments s = c * P + p (channel c, piece p of its positions) are grouped into G groups of
// `segments_per_group` consecutive segments: a group of C/G whole channels when G | C (P = 1),
// one piece of one channel when G = P * C. So the group of segment s is s / segments_per_group.
// Affine parameters stay per channel: channel of segment s is s / P.
template <typename T>
struct GroupNormForward {
  int64_t segments_per_group;
  const double* seg_mean;     // (C*P,) batch statistics per segment (equal counts); unused if !use_batch
  const double* seg_m2;
  T seg_count;                // values per segment, N * S / P
  bool use_batch;             // batch statistics (training, or no running statistics)
  const T* running_mean;      // (G,) used when !use_batch
  const T* running_var;
  T eps;
  T* batch_mean;              // (G,) when use_batch
  T* batch_var;
  T* center;                  // (G,) statistics used
  T* invstd;
};

// Per group g: merge its segments' moments with Chan's formula, in double (O(G) work; float
// segment means near a large common offset would lose the spread between them).
template <typename T>
C10_HOST_DEVICE inline void group_norm_forward_coefficients(int64_t g, const GroupNormForward<T>& a) {
  T mean, var;
  if (a.use_batch) {
    double count = 0, group_mean = 0, m2 = 0;
    for (int64_t s = g * a.segments_per_group; s < (g + 1) * a.segments_per_group; ++s) {
      chan_merge<double>(count, group_mean, m2, double(a.seg_count), a.seg_mean[s], a.seg_m2[s]);
    }
    mean = T(group_mean);
    var = T(m2 / count);
    a.batch_mean[g] = mean;
    a.batch_var[g] = var;
  } else {
    mean = a.running_mean[g];
    var = a.running_var[g];
  }
  a.center[g] = mean;
  a.invstd[g] = inverse_std(var, a.eps);
}

// Per segment s: its group's statistics with its channel's affine parameters.
template <typename T>
struct GroupNormApply {
  int64_t segments_per_group;
  int64_t pieces;             // P
  const T* group_center;      // (G,)
  const T* group_invstd;
  const T* weight;            // (C,)
  const T* bias;
  T* center;                  // (C*P,) segment tables for the apply kernel
  T* scale;
  T* shift;
};

template <typename T>
C10_HOST_DEVICE inline void group_norm_apply_coefficients(int64_t s, const GroupNormApply<T>& a) {
  const int64_t g = s / a.segments_per_group;
  const int64_t c = s / a.pieces;
  a.center[s] = a.group_center[g];
  a.scale[s] = weight_or_one(a.weight, c) * a.group_invstd[g];
  a.shift[s] = bias_or_zero(a.bias, c);
}

// Backward, per group g: the reduction terms pool gamma-weighted sums over the group's
// segments (its channels have different gammas); no reduction terms with running statistics.
template <typename T>
struct GroupNormBackward {
  int64_t segments_per_group;
  int64_t pieces;
  const T* sum_dy;            // (C*P,) per segment
  const T* sum_dy_xc;         // (C*P,) sum of dy * (x - group mean)
  T group_count;              // N * S * C / G
  bool use_batch;
  const T* weight;            // (C,)
  const T* group_invstd;      // (G,)
  T* group_k_x;               // (G,)
  T* group_k_0;
};

template <typename T>
C10_HOST_DEVICE inline void group_norm_backward_coefficients(int64_t g, const GroupNormBackward<T>& a) {
  T k_x = 0, k_0 = 0;
  if (a.use_batch) {
    T sum_g = 0, sum_g_xc = 0;
    for (int64_t s = g * a.segments_per_group; s < (g + 1) * a.segments_per_group; ++s) {
      const T gamma = weight_or_one(a.weight, s / a.pieces);
      sum_g += gamma * a.sum_dy[s];
      sum_g_xc += gamma * a.sum_dy_xc[s];
    }
    reduction_terms(a.group_invstd[g], sum_g, sum_g_xc, a.group_count, k_x, k_0);
  }
  a.group_k_x[g] = k_x;
  a.group_k_0[g] = k_0;
}

// Per segment s: backward apply coefficients.
template <typename T>
struct GroupNormGradApply {
  int64_t segments_per_group;
  int64_t pieces;
  const T* weight;
  const T* group_invstd;
  const T* group_k_x;
  const T* group_k_0;
  T* k_dy;                    // (C*P,)
  T* k_x;
  T* k_0;
};

template <typename T>
C10_HOST_DEVICE inline void group_norm_grad_apply_coefficients(int64_t s, const GroupNormGradApply<T>& a) {
  const int64_t g = s / a.segments_per_group;
  a.k_dy[s] = weight_or_one(a.weight, s / a.pieces) * a.group_invstd[g];
  a.k_x[s] = a.group_k_x[g];
  a.k_0[s] = a.group_k_0[g];
}

// Per channel c: d gamma = sum over its pieces of sum(dy * xhat), d beta = sum(dy).
template <typename T>
struct GroupNormParamGrads {
  int64_t segments_per_group;
  int64_t pieces;
  const T* sum_dy;
  const T* sum_dy_xc;
  const T* group_invstd;
  T* grad_weight;             // (C,)
  T* grad_bias;
};

template <typename T>
C10_HOST_DEVICE inline void group_norm_param_grads(int64_t c, const GroupNormParamGrads<T>& a) {
  T gw = 0, gb = 0;
  for (int64_t s = c * a.pieces; s < (c + 1) * a.pieces; ++s) {
    gw += a.sum_dy_xc[s] * a.group_invstd[s / a.segments_per_group];
    gb += a.sum_dy[s];
  }
  a.grad_weight[c] = gw;
  a.grad_bias[c] = gb;
}

// ---------------------------------------------------------------------------------- CBN
// Per channel c: the current batch's statistics (mu_t, var_t) averaged with the compensated
// past entries kept for this channel (constants), count_c = 1 + kept entries:
//     mu  = (mu_t + sum mu') / count_c
//     var = (var_t + sum var' + spread) / count_c,  spread = sum over entries of (mu_e - mu)^2
// the published mean(nu) - mu^2 without its cancellation. With running statistics and no
// batch statistics (eval) it is plain BN.
template <typename T>
struct CrossIterationForward {
  const double* seg_mean;     // (C,) current batch (double: segment_stats); unused if !use_batch
  const double* seg_m2;
  T count;                    // N * S
  bool use_batch;
  int64_t channels;           // C, the row stride of the past tables
  int64_t past_entries;       // K
  const T* past_mean;         // (K, C) compensated past statistics
  const T* past_var;
  const bool* past_keep;      // (K, C)
  const T* running_mean;      // (C,) used when !use_batch
  const T* running_var;
  const T* weight;
  const T* bias;
  T eps;
  T* batch_mean;              // (C,) mu_t, var_t: the running update and the window take them
  T* batch_var;
  T* center;                  // (C,) mu (combined) and its invstd
  T* invstd;
  T* scale;
  T* shift;
};

template <typename T>
C10_HOST_DEVICE inline void cross_iteration_forward_coefficients(int64_t c, const CrossIterationForward<T>& a) {
  T mean, var;
  if (a.use_batch) {
    const T mu_t = T(a.seg_mean[c]);
    const T var_t = T(a.seg_m2[c] / double(a.count));
    a.batch_mean[c] = mu_t;
    a.batch_var[c] = var_t;
    T entries = 1, sum_mean = mu_t, sum_var = var_t;
    for (int64_t k = 0; k < a.past_entries; ++k) {
      const int64_t i = k * a.channels + c;
      if (a.past_keep[i]) {
        entries += T(1);
        sum_mean += a.past_mean[i];
        sum_var += a.past_var[i];
      }
    }
    mean = sum_mean / entries;
    T spread = (mu_t - mean) * (mu_t - mean);
    for (int64_t k = 0; k < a.past_entries; ++k) {
      const int64_t i = k * a.channels + c;
      if (a.past_keep[i]) spread += (a.past_mean[i] - mean) * (a.past_mean[i] - mean);
    }
    var = (sum_var + spread) / entries;
  } else {
    mean = a.running_mean[c];
    var = a.running_var[c];
  }
  normalise_channel(c, mean, var, a);
}

// The past entries are constants, so the mean and variance depend on this batch through
// mu_t / count_c and var_t / count_c: the BN backward with its reductions divided by count_c * M.
// (sum_dy_xc: sum of dy * (x - mu), mu the combined mean.)
template <typename T>
struct CrossIterationBackward : ChannelBackward<T> {
  bool use_batch;
  int64_t channels;
  int64_t past_entries;
  const bool* past_keep;      // (K, C)
};

template <typename T>
C10_HOST_DEVICE inline void cross_iteration_backward_coefficients(int64_t c, const CrossIterationBackward<T>& a) {
  T entries = 1;
  if (a.use_batch) {
    for (int64_t k = 0; k < a.past_entries; ++k) entries += a.past_keep[k * a.channels + c] ? T(1) : T(0);
  }
  channel_backward(c, a, a.use_batch, entries * a.count);
}

// Each coefficient function as a functor type, so that a backend can run it over an index
// range its own way (the CPU a loop, CUDA one thread per index): Step()(i, args).
#define STOCHNORM_COEFFICIENT_STEP(NAME, FUNCTION)                                              \
  struct NAME {                                                                                  \
    template <typename Args>                                                                     \
    C10_HOST_DEVICE void operator()(int64_t i, const Args& args) const { FUNCTION(i, args); }    \
  };

STOCHNORM_COEFFICIENT_STEP(StochNormForwardStep, stoch_norm_forward_coefficients)
STOCHNORM_COEFFICIENT_STEP(StochNormBackwardStep, stoch_norm_backward_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormForwardStep, group_norm_forward_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormApplyStep, group_norm_apply_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormBackwardStep, group_norm_backward_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormGradApplyStep, group_norm_grad_apply_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormParamGradsStep, group_norm_param_grads)
STOCHNORM_COEFFICIENT_STEP(CrossIterationForwardStep, cross_iteration_forward_coefficients)
STOCHNORM_COEFFICIENT_STEP(CrossIterationBackwardStep, cross_iteration_backward_coefficients)
#undef STOCHNORM_COEFFICIENT_STEP

}  // namespace stochnorm_ext::coefficients
