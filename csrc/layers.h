// The three layers and the four core ops, written once for every device. Each forward is
// stats pass -> coefficients -> apply pass and each backward is reduce pass -> coefficients ->
// apply pass: the big passes come from the device's shared core, the small per-layer math from
// coefficients.h. A backend (csrc/cpu/layers_cpu.cpp, csrc/cuda/layers_cuda.cu) describes its
// device in a struct and registers these templates for it with register_kernels<Device>.
//
// Device (static members only):
//   Guard enter(const Tensor& input, const char* op)  checks that the input is on this device
//       and returns what must live for the whole op (CUDA: a CUDAGuard on the input's device)
//   segment_stats, segment_apply, segment_grad_sums, segment_grad_apply  the four passes on
//       SegmentInputs (csrc/cpu/segment_core.h, csrc/cuda/segment_core.h)
//   template <typename Step, typename Args> void for_each_index(int64_t n, const Args& args)
//       Step()(i, args) for every i < n (coefficients.h's *Step functors), in stream order
//
// Op schemas: csrc/ops.cpp. Python glue (fake tensors, autograd): stochnorm_ext/_ops.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "coefficients.h"
#include "common.h"

namespace stochnorm_ext::layers {

namespace cf = coefficients;
using at::Tensor;
using common::acc_vector;
using common::bool_arg;
using common::mutable_ptr_or_null;
using common::new_output;
using common::ptr_or_null;
using common::required_acc_vector;
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // y, batch_mean, batch_var, center, invstd
using BackwardResult = std::tuple<Tensor, Tensor, Tensor>;                // grad_input, grad_weight, grad_bias

#define STOCHNORM_ACC_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

inline at::TensorOptions acc_options(const Tensor& input) {
  return input.options().dtype(common::accumulate_type(input.scalar_type()));
}

// ======================================================================== per-channel backward
// StochNorm and CBN share their backward but for the per-channel coefficients: the reduce pass
// (sum dy, sum dy (x - center)) and the buffers come from here, the layer's coefficients Step
// fills k_dy, k_x, k_0 and the parameter gradients, then finish() runs the apply pass.

template <typename Device>
struct ChannelBackwardPass {
  common::SegmentInput in;
  at::TensorOptions acc;
  Tensor w, ctr, r, sum_dy, sum_dy_xc, k_dy, k_x, k_0, grad_weight, grad_bias;

  ChannelBackwardPass(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
                      const Tensor& center, const Tensor& invstd, const char* op)
      : in(common::segment_input(input, 1)), acc(acc_options(input)) {
    const int64_t C = input.size(1);
    w = acc_vector(weight, C, input, op, "weight");
    ctr = required_acc_vector(center, C, input, op, "center");
    r = required_acc_vector(invstd, C, input, op, "invstd");
    std::tie(sum_dy, sum_dy_xc) = Device::segment_grad_sums(grad_output, in, ctr);
    k_dy = at::empty({C}, acc), k_x = at::empty({C}, acc), k_0 = at::empty({C}, acc);
    grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  }

  template <typename scalar_t>
  cf::ChannelBackward<scalar_t> args() const {
    return {sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(), scalar_t(in.geometry.count()),
            ptr_or_null<scalar_t>(w), r.const_data_ptr<scalar_t>(), k_dy.data_ptr<scalar_t>(),
            k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
            grad_bias.data_ptr<scalar_t>()};
  }

  BackwardResult finish(const Tensor& grad_output, const std::optional<Tensor>& weight) const {
    Tensor grad_input = Device::segment_grad_apply(grad_output, in, ctr, k_dy, k_x, k_0);
    return {grad_input, common::in_weight_dtype(grad_weight, weight), common::in_weight_dtype(grad_bias, weight)};
  }
};

// ======================================================================== StochNorm
// mask (C,) bool: True = this batch's statistics, False = the running statistics as passed in
// (the caller updates them after this call, from batch_mean/batch_var). No mask: eval, every
// channel takes the running statistics and no batch statistics are computed.

template <typename Device>
ForwardResult stoch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const Tensor& running_mean,
                                 const Tensor& running_var, const std::optional<Tensor>& mask, double eps) {
  constexpr const char* op = "stoch_norm_forward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1);
  const bool training = mask.has_value() && mask->defined();
  const common::SegmentInput in = common::segment_input(input, 1);
  const at::TensorOptions acc = acc_options(input);
  const Tensor w = acc_vector(weight, C, input, op, "weight"), b = acc_vector(bias, C, input, op, "bias");
  const Tensor rm = required_acc_vector(running_mean, C, input, op, "running_mean");
  const Tensor rv = required_acc_vector(running_var, C, input, op, "running_var");
  const Tensor m = training ? bool_arg(*mask, {C}, input, op, "mask") : Tensor();
  Tensor seg_mean, seg_m2;
  if (training) std::tie(seg_mean, seg_m2) = Device::segment_stats(in);
  Tensor batch_mean = new_output({training ? C : 0}, acc), batch_var = new_output({training ? C : 0}, acc);
  Tensor center = new_output({C}, acc), invstd = new_output({C}, acc);
  Tensor scale = at::empty({C}, acc), shift = at::empty({C}, acc);
  STOCHNORM_ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::StochNormForward<scalar_t> a{
        ptr_or_null<bool>(m), ptr_or_null<double>(seg_mean), ptr_or_null<double>(seg_m2),
        scalar_t(in.geometry.count()), rm.const_data_ptr<scalar_t>(), rv.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), scalar_t(eps),
        mutable_ptr_or_null<scalar_t>(batch_mean), mutable_ptr_or_null<scalar_t>(batch_var),
        center.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::StochNormForwardStep>(C, a);
  });
  Tensor y = Device::segment_apply(in, center, scale, shift);
  return {y, batch_mean, batch_var, center, invstd};
}

template <typename Device>
BackwardResult stoch_norm_backward(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
                                   const std::optional<Tensor>& mask, const Tensor& center, const Tensor& invstd) {
  constexpr const char* op = "stoch_norm_backward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1);
  const Tensor m = mask.has_value() && mask->defined() ? bool_arg(*mask, {C}, input, op, "mask") : Tensor();
  ChannelBackwardPass<Device> pass(grad_output, input, weight, center, invstd, op);
  STOCHNORM_ACC_DISPATCH(pass.acc.dtype().toScalarType(), op, [&] {
    const cf::StochNormBackward<scalar_t> a{pass.template args<scalar_t>(), ptr_or_null<bool>(m)};
    Device::template for_each_index<cf::StochNormBackwardStep>(C, a);
  });
  return pass.finish(grad_output, weight);
}

// BGN and CBN forwards: training reads the per-segment batch statistics (seg_mean, seg_m2,
// double), eval the (n,) running statistics (rm, rv), which must then be given.
template <typename Device>
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_or_running_stats(
    const common::SegmentInput& in, bool use_batch_stats, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, int64_t n, const Tensor& input, const char* op) {
  if (use_batch_stats) {
    auto [seg_mean, seg_m2] = Device::segment_stats(in);
    return {seg_mean, seg_m2, Tensor(), Tensor()};
  }
  return {Tensor(), Tensor(), required_acc_vector(running_mean, n, input, op, "running_mean (no batch statistics)"),
          required_acc_vector(running_var, n, input, op, "running_var (no batch statistics)")};
}

// ======================================================================== BGN
// G | C: groups of C/G whole channels, per-channel segments (P = 1). G = P * C: each channel
// cut into P pieces of its flattened positions, one group per (channel, piece) segment.
// Statistics and running statistics are per group (G,), affine parameters per channel.

template <typename Device>
ForwardResult batch_group_norm_forward(const Tensor& input, int64_t num_groups, const std::optional<Tensor>& weight,
                                       const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                                       const std::optional<Tensor>& running_var, bool use_batch_stats, double eps) {
  constexpr const char* op = "batch_group_norm_forward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1), G = num_groups, P = common::bgn_pieces(input, G, op);
  const int64_t segments = C * P, segments_per_group = segments / G;
  const common::SegmentInput in = common::segment_input(input, P);
  const at::TensorOptions acc = acc_options(input);
  const Tensor w = acc_vector(weight, C, input, op, "weight"), b = acc_vector(bias, C, input, op, "bias");
  Tensor rm, rv, seg_mean, seg_m2;
  std::tie(seg_mean, seg_m2, rm, rv) =
      batch_or_running_stats<Device>(in, use_batch_stats, running_mean, running_var, G, input, op);
  Tensor batch_mean = new_output({use_batch_stats ? G : 0}, acc), batch_var = new_output({use_batch_stats ? G : 0}, acc);
  Tensor center = new_output({G}, acc), invstd = new_output({G}, acc);
  Tensor seg_center = at::empty({C, P}, acc), seg_scale = at::empty({C, P}, acc), seg_shift = at::empty({C, P}, acc);
  STOCHNORM_ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::GroupNormForward<scalar_t> group{
        segments_per_group, ptr_or_null<double>(seg_mean), ptr_or_null<double>(seg_m2),
        scalar_t(in.geometry.count()), use_batch_stats, ptr_or_null<scalar_t>(rm), ptr_or_null<scalar_t>(rv),
        scalar_t(eps), mutable_ptr_or_null<scalar_t>(batch_mean), mutable_ptr_or_null<scalar_t>(batch_var),
        center.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::GroupNormForwardStep>(G, group);
    // In order (CUDA: same stream): the segment step reads the group tables the step above wrote.
    const cf::GroupNormApply<scalar_t> segment{
        segments_per_group, P, center.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), seg_center.data_ptr<scalar_t>(),
        seg_scale.data_ptr<scalar_t>(), seg_shift.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::GroupNormApplyStep>(segments, segment);
  });
  Tensor y = Device::segment_apply(in, seg_center, seg_scale, seg_shift);
  return {y, batch_mean, batch_var, center, invstd};
}

template <typename Device>
BackwardResult batch_group_norm_backward(const Tensor& grad_output, const Tensor& input, int64_t num_groups,
                                         const std::optional<Tensor>& weight, const Tensor& center,
                                         const Tensor& invstd, bool use_batch_stats) {
  constexpr const char* op = "batch_group_norm_backward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1), G = num_groups, P = common::bgn_pieces(input, G, op);
  const int64_t segments = C * P, segments_per_group = segments / G;
  const common::SegmentInput in = common::segment_input(input, P);
  const at::TensorOptions acc = acc_options(input);
  const Tensor w = acc_vector(weight, C, input, op, "weight");
  const Tensor group_center = required_acc_vector(center, G, input, op, "center");
  const Tensor group_invstd = required_acc_vector(invstd, G, input, op, "invstd");
  // Each segment is centred on its group's mean (groups are runs of consecutive segments).
  const Tensor seg_center = group_center.view({G, 1}).expand({G, segments_per_group}).reshape({C, P}).contiguous();
  Tensor sum_dy, sum_dy_xc;  // (no structured binding: lambdas capture them, C++17)
  std::tie(sum_dy, sum_dy_xc) = Device::segment_grad_sums(grad_output, in, seg_center);
  Tensor group_k_x = at::empty({G}, acc), group_k_0 = at::empty({G}, acc);
  Tensor k_dy = at::empty({C, P}, acc), k_x = at::empty({C, P}, acc), k_0 = at::empty({C, P}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  STOCHNORM_ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::GroupNormBackward<scalar_t> group{
        segments_per_group, P, sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        scalar_t(in.geometry.count() * segments_per_group), use_batch_stats, ptr_or_null<scalar_t>(w),
        group_invstd.const_data_ptr<scalar_t>(), group_k_x.data_ptr<scalar_t>(), group_k_0.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::GroupNormBackwardStep>(G, group);
    const cf::GroupNormGradApply<scalar_t> segment{
        segments_per_group, P, ptr_or_null<scalar_t>(w), group_invstd.const_data_ptr<scalar_t>(),
        group_k_x.const_data_ptr<scalar_t>(), group_k_0.const_data_ptr<scalar_t>(), k_dy.data_ptr<scalar_t>(),
        k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::GroupNormGradApplyStep>(segments, segment);
    const cf::GroupNormParamGrads<scalar_t> channel{
        segments_per_group, P, sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        group_invstd.const_data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::GroupNormParamGradsStep>(C, channel);
  });
  Tensor grad_input = Device::segment_grad_apply(grad_output, in, seg_center, k_dy, k_x, k_0);
  return {grad_input, common::in_weight_dtype(grad_weight, weight), common::in_weight_dtype(grad_bias, weight)};
}

// ======================================================================== CBN
// past_mean / past_var (K, C): the compensated statistics of the stored steps, constants;
// past_keep (K, C) bool: which of them count for each channel (see cbn_window.py).

template <typename Device>
ForwardResult cross_iteration_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias,
                                           const std::optional<Tensor>& running_mean,
                                           const std::optional<Tensor>& running_var, const Tensor& past_mean,
                                           const Tensor& past_var, const Tensor& past_keep, bool use_batch_stats,
                                           double eps) {
  constexpr const char* op = "cross_iteration_norm_forward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1);
  const common::SegmentInput in = common::segment_input(input, 1);
  const at::TensorOptions acc = acc_options(input);
  TORCH_CHECK(past_mean.dim() == 2 && past_mean.size(1) == C && past_var.sizes() == past_mean.sizes(), op,
              ": past_mean and past_var must have shape (K, ", C, "), got ", past_mean.sizes(), " and ", past_var.sizes());
  TORCH_CHECK(past_mean.device() == input.device() && past_var.device() == input.device(), op,
              ": past_mean and past_var are on ", past_mean.device(), " and ", past_var.device(),
              " but the input is on ", input.device());
  const int64_t K = past_mean.size(0);
  const Tensor keep = bool_arg(past_keep, {K, C}, input, op, "past_keep");
  const Tensor p_mean = past_mean.to(acc.dtype()).contiguous(), p_var = past_var.to(acc.dtype()).contiguous();
  const Tensor w = acc_vector(weight, C, input, op, "weight"), b = acc_vector(bias, C, input, op, "bias");
  Tensor rm, rv, seg_mean, seg_m2;
  std::tie(seg_mean, seg_m2, rm, rv) =
      batch_or_running_stats<Device>(in, use_batch_stats, running_mean, running_var, C, input, op);
  Tensor batch_mean = new_output({use_batch_stats ? C : 0}, acc), batch_var = new_output({use_batch_stats ? C : 0}, acc);
  Tensor center = new_output({C}, acc), invstd = new_output({C}, acc);
  Tensor scale = at::empty({C}, acc), shift = at::empty({C}, acc);
  STOCHNORM_ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::CrossIterationForward<scalar_t> a{
        ptr_or_null<double>(seg_mean), ptr_or_null<double>(seg_m2), scalar_t(in.geometry.count()),
        use_batch_stats, C, K, p_mean.const_data_ptr<scalar_t>(), p_var.const_data_ptr<scalar_t>(),
        keep.const_data_ptr<bool>(), ptr_or_null<scalar_t>(rm), ptr_or_null<scalar_t>(rv), ptr_or_null<scalar_t>(w),
        ptr_or_null<scalar_t>(b), scalar_t(eps), mutable_ptr_or_null<scalar_t>(batch_mean),
        mutable_ptr_or_null<scalar_t>(batch_var), center.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>()};
    Device::template for_each_index<cf::CrossIterationForwardStep>(C, a);
  });
  Tensor y = Device::segment_apply(in, center, scale, shift);
  return {y, batch_mean, batch_var, center, invstd};
}

template <typename Device>
BackwardResult cross_iteration_norm_backward(const Tensor& grad_output, const Tensor& input,
                                             const std::optional<Tensor>& weight, const Tensor& center,
                                             const Tensor& invstd, const Tensor& past_keep, bool use_batch_stats) {
  constexpr const char* op = "cross_iteration_norm_backward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1);
  TORCH_CHECK(past_keep.dim() == 2, op, ": past_keep must have shape (K, ", C, "), got ", past_keep.sizes());
  const int64_t K = past_keep.size(0);
  const Tensor keep = bool_arg(past_keep, {K, C}, input, op, "past_keep");
  ChannelBackwardPass<Device> pass(grad_output, input, weight, center, invstd, op);
  STOCHNORM_ACC_DISPATCH(pass.acc.dtype().toScalarType(), op, [&] {
    const cf::CrossIterationBackward<scalar_t> a{pass.template args<scalar_t>(), use_batch_stats, C, K,
                                                 keep.const_data_ptr<bool>()};
    Device::template for_each_index<cf::CrossIterationBackwardStep>(C, a);
  });
  return pass.finish(grad_output, weight);
}

#undef STOCHNORM_ACC_DISPATCH

// ======================================================================== the core ops
// Thin wrappers registered as stochnorm_ext::segment_*: the statistics and the apply are
// separate ops so that distributed training can all-reduce the per-segment partial statistics
// (and the backward sums) between them.

template <typename Device>
std::tuple<Tensor, Tensor> segment_stats_op(const Tensor& input, int64_t pieces) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_stats");
  return Device::segment_stats(common::segment_input(input, pieces));
}

template <typename Device>
Tensor segment_apply_op(const Tensor& input, const Tensor& center, const Tensor& scale, const Tensor& shift) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_apply");
  return Device::segment_apply(common::segment_input(input, common::pieces_of(input, center)), center, scale, shift);
}

template <typename Device>
std::tuple<Tensor, Tensor> segment_grad_sums_op(const Tensor& grad_output, const Tensor& input, const Tensor& center) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_grad_sums");
  return Device::segment_grad_sums(grad_output, common::segment_input(input, common::pieces_of(input, center)),
                                   center);
}

template <typename Device>
Tensor segment_grad_apply_op(const Tensor& grad_output, const Tensor& input, const Tensor& center, const Tensor& k_dy,
                             const Tensor& k_x, const Tensor& k_0) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_grad_apply");
  return Device::segment_grad_apply(grad_output, common::segment_input(input, common::pieces_of(input, center)),
                                    center, k_dy, k_x, k_0);
}

// Every device op of the library (schemas: csrc/ops.cpp), for one device.
template <typename Device>
void register_kernels(torch::Library& m) {
  m.impl("segment_stats", &segment_stats_op<Device>);
  m.impl("segment_apply", &segment_apply_op<Device>);
  m.impl("segment_grad_sums", &segment_grad_sums_op<Device>);
  m.impl("segment_grad_apply", &segment_grad_apply_op<Device>);
  m.impl("stoch_norm_forward", &stoch_norm_forward<Device>);
  m.impl("stoch_norm_backward", &stoch_norm_backward<Device>);
  m.impl("batch_group_norm_forward", &batch_group_norm_forward<Device>);
  m.impl("batch_group_norm_backward", &batch_group_norm_backward<Device>);
  m.impl("cross_iteration_norm_forward", &cross_iteration_norm_forward<Device>);
  m.impl("cross_iteration_norm_backward", &cross_iteration_norm_backward<Device>);
}

}  // namespace stochnorm_ext::layers
