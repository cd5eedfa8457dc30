// The three layers on CPU: each forward is stats pass -> coefficients -> apply pass and each
// backward is reduce pass -> coefficients -> apply pass, with the big passes from the shared
// core (segment_core.h) and the small per-layer math from coefficients.h (shared with a CUDA
// implementation, which runs the same coefficient functions one thread per index).
//
// Op schemas: csrc/ops.cpp. Python glue (fake tensors, autograd): stochnorm_ext/_ops.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../coefficients.h"
#include "segment_core.h"

namespace stochnorm_ext::cpu {
namespace {

namespace cf = coefficients;
using at::Tensor;
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // y, batch_mean, batch_var, center, invstd
using BackwardResult = std::tuple<Tensor, Tensor, Tensor>;                // grad_input, grad_weight, grad_bias

// Argument checks and small helpers, shared with the CUDA backend (same messages).
using common::acc_vector;
using common::bgn_pieces;
using common::bool_arg;
using common::check_input;
using common::in_weight_dtype;
using common::mutable_ptr_or_null;
using common::ptr_or_null;
using common::required_acc_vector;

#define ACC_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

// ======================================================================== StochNorm
// mask (C,) bool: True = this batch's statistics, False = the running statistics as passed in
// (the caller updates them after this call, from batch_mean/batch_var). No mask: eval, every
// channel takes the running statistics and no batch statistics are computed.

ForwardResult stoch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const Tensor& running_mean,
                                 const Tensor& running_var, const std::optional<Tensor>& mask, double eps) {
  constexpr const char* op = "stoch_norm_forward";
  check_input(input, op);
  const int64_t C = input.size(1);
  const bool training = mask.has_value() && mask->defined();
  const SegmentInput in = segment_input(input, 1);
  const at::TensorOptions acc = input.options().dtype(accumulate_type(input.scalar_type()));
  const Tensor w = acc_vector(weight, C, input, op, "weight"), b = acc_vector(bias, C, input, op, "bias");
  const Tensor rm = required_acc_vector(running_mean, C, input, op, "running_mean");
  const Tensor rv = required_acc_vector(running_var, C, input, op, "running_var");
  const Tensor m = training ? bool_arg(*mask, {C}, input, op, "mask") : Tensor();
  Tensor seg_mean, seg_m2;
  if (training) std::tie(seg_mean, seg_m2) = segment_stats(in);
  Tensor batch_mean = new_output({training ? C : 0}, acc), batch_var = new_output({training ? C : 0}, acc);
  Tensor center = new_output({C}, acc), invstd = new_output({C}, acc);
  Tensor scale = at::empty({C}, acc), shift = at::empty({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::StochNormForward<scalar_t> a{
        ptr_or_null<bool>(m), ptr_or_null<scalar_t>(seg_mean), ptr_or_null<scalar_t>(seg_m2),
        scalar_t(in.geometry.count()), rm.const_data_ptr<scalar_t>(), rv.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), scalar_t(eps),
        mutable_ptr_or_null<scalar_t>(batch_mean), mutable_ptr_or_null<scalar_t>(batch_var),
        center.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>()};
    for (int64_t c = 0; c < C; ++c) cf::stoch_norm_forward_coefficients(c, a);
  });
  Tensor y = segment_apply(in, center, scale, shift);
  return {y, batch_mean, batch_var, center, invstd};
}

BackwardResult stoch_norm_backward(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
                                   const std::optional<Tensor>& mask, const Tensor& center, const Tensor& invstd) {
  constexpr const char* op = "stoch_norm_backward";
  check_input(input, op);
  const int64_t C = input.size(1);
  const SegmentInput in = segment_input(input, 1);
  const at::TensorOptions acc = input.options().dtype(accumulate_type(input.scalar_type()));
  const Tensor w = acc_vector(weight, C, input, op, "weight");
  const Tensor ctr = required_acc_vector(center, C, input, op, "center");
  const Tensor r = required_acc_vector(invstd, C, input, op, "invstd");
  const Tensor m = mask.has_value() && mask->defined() ? bool_arg(*mask, {C}, input, op, "mask") : Tensor();
  Tensor sum_dy, sum_dy_xc;  // (no structured binding: lambdas capture them, C++17)
  std::tie(sum_dy, sum_dy_xc) = segment_grad_sums(grad_output, in, ctr);
  Tensor k_dy = at::empty({C}, acc), k_x = at::empty({C}, acc), k_0 = at::empty({C}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::StochNormBackward<scalar_t> a{
        ptr_or_null<bool>(m), sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        scalar_t(in.geometry.count()), ptr_or_null<scalar_t>(w), r.const_data_ptr<scalar_t>(),
        k_dy.data_ptr<scalar_t>(), k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>(),
        grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    for (int64_t c = 0; c < C; ++c) cf::stoch_norm_backward_coefficients(c, a);
  });
  Tensor grad_input = segment_grad_apply(grad_output, in, ctr, k_dy, k_x, k_0);
  return {grad_input, in_weight_dtype(grad_weight, weight), in_weight_dtype(grad_bias, weight)};
}

// ======================================================================== BGN
// G | C: groups of C/G whole channels, per-channel segments (P = 1). G = P * C: each channel
// cut into P pieces of its flattened positions, one group per (channel, piece) segment.
// Statistics and running statistics are per group (G,), affine parameters per channel.

ForwardResult batch_group_norm_forward(const Tensor& input, int64_t num_groups, const std::optional<Tensor>& weight,
                                       const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                                       const std::optional<Tensor>& running_var, bool use_batch_stats, double eps) {
  constexpr const char* op = "batch_group_norm_forward";
  check_input(input, op);
  const int64_t C = input.size(1), G = num_groups, P = bgn_pieces(input, G, op);
  const int64_t segments = C * P, segments_per_group = segments / G;
  const SegmentInput in = segment_input(input, P);
  const at::TensorOptions acc = input.options().dtype(accumulate_type(input.scalar_type()));
  const Tensor w = acc_vector(weight, C, input, op, "weight"), b = acc_vector(bias, C, input, op, "bias");
  Tensor rm, rv, seg_mean, seg_m2;
  if (use_batch_stats) {
    std::tie(seg_mean, seg_m2) = segment_stats(in);
  } else {
    rm = required_acc_vector(running_mean, G, input, op, "running_mean (no batch statistics)");
    rv = required_acc_vector(running_var, G, input, op, "running_var (no batch statistics)");
  }
  Tensor batch_mean = new_output({use_batch_stats ? G : 0}, acc), batch_var = new_output({use_batch_stats ? G : 0}, acc);
  Tensor center = new_output({G}, acc), invstd = new_output({G}, acc);
  Tensor seg_center = at::empty({C, P}, acc), seg_scale = at::empty({C, P}, acc), seg_shift = at::empty({C, P}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::GroupNormForward<scalar_t> group{
        segments_per_group, ptr_or_null<scalar_t>(seg_mean), ptr_or_null<scalar_t>(seg_m2),
        scalar_t(in.geometry.count()), use_batch_stats, ptr_or_null<scalar_t>(rm), ptr_or_null<scalar_t>(rv),
        scalar_t(eps), mutable_ptr_or_null<scalar_t>(batch_mean), mutable_ptr_or_null<scalar_t>(batch_var),
        center.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>()};
    for (int64_t g = 0; g < G; ++g) cf::group_norm_forward_coefficients(g, group);
    const cf::GroupNormApply<scalar_t> segment{
        segments_per_group, P, center.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), seg_center.data_ptr<scalar_t>(),
        seg_scale.data_ptr<scalar_t>(), seg_shift.data_ptr<scalar_t>()};
    for (int64_t s = 0; s < segments; ++s) cf::group_norm_apply_coefficients(s, segment);
  });
  Tensor y = segment_apply(in, seg_center, seg_scale, seg_shift);
  return {y, batch_mean, batch_var, center, invstd};
}

BackwardResult batch_group_norm_backward(const Tensor& grad_output, const Tensor& input, int64_t num_groups,
                                         const std::optional<Tensor>& weight, const Tensor& center,
                                         const Tensor& invstd, bool use_batch_stats) {
  constexpr const char* op = "batch_group_norm_backward";
  check_input(input, op);
  const int64_t C = input.size(1), G = num_groups, P = bgn_pieces(input, G, op);
  const int64_t segments = C * P, segments_per_group = segments / G;
  const SegmentInput in = segment_input(input, P);
  const at::TensorOptions acc = input.options().dtype(accumulate_type(input.scalar_type()));
  const Tensor w = acc_vector(weight, C, input, op, "weight");
  const Tensor group_center = required_acc_vector(center, G, input, op, "center");
  const Tensor group_invstd = required_acc_vector(invstd, G, input, op, "invstd");
  // Each segment is centred on its group's mean.
  Tensor seg_center = group_center.repeat_interleave(segments_per_group).view({C, P});
  Tensor sum_dy, sum_dy_xc;  // (no structured binding: lambdas capture them, C++17)
  std::tie(sum_dy, sum_dy_xc) = segment_grad_sums(grad_output, in, seg_center);
  Tensor group_k_x = at::empty({G}, acc), group_k_0 = at::empty({G}, acc);
  Tensor k_dy = at::empty({C, P}, acc), k_x = at::empty({C, P}, acc), k_0 = at::empty({C, P}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::GroupNormBackward<scalar_t> group{
        segments_per_group, P, sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        scalar_t(in.geometry.count() * segments_per_group), use_batch_stats, ptr_or_null<scalar_t>(w),
        group_invstd.const_data_ptr<scalar_t>(), group_k_x.data_ptr<scalar_t>(), group_k_0.data_ptr<scalar_t>()};
    for (int64_t g = 0; g < G; ++g) cf::group_norm_backward_coefficients(g, group);
    const cf::GroupNormGradApply<scalar_t> segment{
        segments_per_group, P, ptr_or_null<scalar_t>(w), group_invstd.const_data_ptr<scalar_t>(),
        group_k_x.const_data_ptr<scalar_t>(), group_k_0.const_data_ptr<scalar_t>(), k_dy.data_ptr<scalar_t>(),
        k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>()};
    for (int64_t s = 0; s < segments; ++s) cf::group_norm_grad_apply_coefficients(s, segment);
    const cf::GroupNormParamGrads<scalar_t> channel{
        segments_per_group, P, sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        group_invstd.const_data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    for (int64_t c = 0; c < C; ++c) cf::group_norm_param_grads(c, channel);
  });
  Tensor grad_input = segment_grad_apply(grad_output, in, seg_center, k_dy, k_x, k_0);
  return {grad_input, in_weight_dtype(grad_weight, weight), in_weight_dtype(grad_bias, weight)};
}

// ======================================================================== CBN
// past_mean / past_var (K, C): the compensated statistics of the stored steps, constants;
// past_keep (K, C) bool: which of them count for each channel (see cbn_window.py).

ForwardResult cross_iteration_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias,
                                           const std::optional<Tensor>& running_mean,
                                           const std::optional<Tensor>& running_var, const Tensor& past_mean,
                                           const Tensor& past_var, const Tensor& past_keep, bool use_batch_stats,
                                           double eps) {
  constexpr const char* op = "cross_iteration_norm_forward";
  check_input(input, op);
  const int64_t C = input.size(1);
  const SegmentInput in = segment_input(input, 1);
  const at::TensorOptions acc = input.options().dtype(accumulate_type(input.scalar_type()));
  TORCH_CHECK(past_mean.dim() == 2 && past_mean.size(1) == C && past_var.sizes() == past_mean.sizes(), op,
              ": past_mean and past_var must have shape (K, ", C, "), got ", past_mean.sizes(), " and ", past_var.sizes());
  const int64_t K = past_mean.size(0);
  const Tensor keep = bool_arg(past_keep, {K, C}, input, op, "past_keep");
  const Tensor p_mean = past_mean.to(acc.dtype()).contiguous(), p_var = past_var.to(acc.dtype()).contiguous();
  const Tensor w = acc_vector(weight, C, input, op, "weight"), b = acc_vector(bias, C, input, op, "bias");
  Tensor rm, rv, seg_mean, seg_m2;
  if (use_batch_stats) {
    std::tie(seg_mean, seg_m2) = segment_stats(in);
  } else {
    rm = required_acc_vector(running_mean, C, input, op, "running_mean (no batch statistics)");
    rv = required_acc_vector(running_var, C, input, op, "running_var (no batch statistics)");
  }
  Tensor batch_mean = new_output({use_batch_stats ? C : 0}, acc), batch_var = new_output({use_batch_stats ? C : 0}, acc);
  Tensor center = new_output({C}, acc), invstd = new_output({C}, acc);
  Tensor scale = at::empty({C}, acc), shift = at::empty({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::CrossIterationForward<scalar_t> a{
        ptr_or_null<scalar_t>(seg_mean), ptr_or_null<scalar_t>(seg_m2), scalar_t(in.geometry.count()),
        use_batch_stats, C, K, p_mean.const_data_ptr<scalar_t>(), p_var.const_data_ptr<scalar_t>(),
        keep.const_data_ptr<bool>(), ptr_or_null<scalar_t>(rm), ptr_or_null<scalar_t>(rv), ptr_or_null<scalar_t>(w),
        ptr_or_null<scalar_t>(b), scalar_t(eps), mutable_ptr_or_null<scalar_t>(batch_mean),
        mutable_ptr_or_null<scalar_t>(batch_var), center.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>()};
    for (int64_t c = 0; c < C; ++c) cf::cross_iteration_forward_coefficients(c, a);
  });
  Tensor y = segment_apply(in, center, scale, shift);
  return {y, batch_mean, batch_var, center, invstd};
}

BackwardResult cross_iteration_norm_backward(const Tensor& grad_output, const Tensor& input,
                                             const std::optional<Tensor>& weight, const Tensor& center,
                                             const Tensor& invstd, const Tensor& past_keep, bool use_batch_stats) {
  constexpr const char* op = "cross_iteration_norm_backward";
  check_input(input, op);
  const int64_t C = input.size(1);
  const SegmentInput in = segment_input(input, 1);
  const at::TensorOptions acc = input.options().dtype(accumulate_type(input.scalar_type()));
  TORCH_CHECK(past_keep.dim() == 2, op, ": past_keep must have shape (K, ", C, "), got ", past_keep.sizes());
  const int64_t K = past_keep.size(0);
  const Tensor keep = bool_arg(past_keep, {K, C}, input, op, "past_keep");
  const Tensor w = acc_vector(weight, C, input, op, "weight");
  const Tensor ctr = required_acc_vector(center, C, input, op, "center");
  const Tensor r = required_acc_vector(invstd, C, input, op, "invstd");
  Tensor sum_dy, sum_dy_xc;  // (no structured binding: lambdas capture them, C++17)
  std::tie(sum_dy, sum_dy_xc) = segment_grad_sums(grad_output, in, ctr);
  Tensor k_dy = at::empty({C}, acc), k_x = at::empty({C}, acc), k_0 = at::empty({C}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::CrossIterationBackward<scalar_t> a{
        sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(), scalar_t(in.geometry.count()),
        use_batch_stats, C, K, keep.const_data_ptr<bool>(), ptr_or_null<scalar_t>(w), r.const_data_ptr<scalar_t>(),
        k_dy.data_ptr<scalar_t>(), k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>(),
        grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    for (int64_t c = 0; c < C; ++c) cf::cross_iteration_backward_coefficients(c, a);
  });
  Tensor grad_input = segment_grad_apply(grad_output, in, ctr, k_dy, k_x, k_0);
  return {grad_input, in_weight_dtype(grad_weight, weight), in_weight_dtype(grad_bias, weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, CPU, m) {
  m.impl("stoch_norm_forward", &stoch_norm_forward);
  m.impl("stoch_norm_backward", &stoch_norm_backward);
  m.impl("batch_group_norm_forward", &batch_group_norm_forward);
  m.impl("batch_group_norm_backward", &batch_group_norm_backward);
  m.impl("cross_iteration_norm_forward", &cross_iteration_norm_forward);
  m.impl("cross_iteration_norm_backward", &cross_iteration_norm_backward);
}

}  // namespace stochnorm_ext::cpu
