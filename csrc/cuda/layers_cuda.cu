// The three layers on CUDA, and the registration of every CUDA kernel of the stochnorm_ext ops
// (schemas: csrc/ops.cpp; fake tensors and autograd: stochnorm_ext/_ops.py, shared by all
// devices). Each forward is stats pass -> coefficients -> apply pass and each backward reduce
// pass -> coefficients -> apply pass: the big passes from the shared core (segment_core.h),
// the small per-layer math from csrc/coefficients.h, run one thread per channel / group /
// segment by per_index_kernel. This file mirrors csrc/cpu/layers_cpu.cpp step for step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../coefficients.h"
#include "segment_core.h"

namespace stochnorm_ext::cuda {
namespace {

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

// ------------------------------------------------------------------------------ coefficient kernels
// One thread per index i < n calls Step()(i, args): Step wraps one function of coefficients.h,
// args is its argument struct (raw device pointers and scalars), passed by value.
template <typename Step, typename Args>
__global__ void per_index_kernel(int64_t n, Args args) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    Step()(i, args);
  }
}

template <typename Step, typename Args>
void for_each_index(int64_t n, const Args& args) {
  if (n <= 0) return;
  constexpr int kThreads = 128;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 65535));
  per_index_kernel<Step, Args><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define STOCHNORM_COEFFICIENT_STEP(NAME, FUNCTION)                                 \
  struct NAME {                                                                    \
    template <typename Args>                                                       \
    __device__ void operator()(int64_t i, const Args& args) const { FUNCTION(i, args); } \
  };

STOCHNORM_COEFFICIENT_STEP(StochNormForwardStep, cf::stoch_norm_forward_coefficients)
STOCHNORM_COEFFICIENT_STEP(StochNormBackwardStep, cf::stoch_norm_backward_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormForwardStep, cf::group_norm_forward_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormApplyStep, cf::group_norm_apply_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormBackwardStep, cf::group_norm_backward_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormGradApplyStep, cf::group_norm_grad_apply_coefficients)
STOCHNORM_COEFFICIENT_STEP(GroupNormParamGradsStep, cf::group_norm_param_grads)
STOCHNORM_COEFFICIENT_STEP(CrossIterationForwardStep, cf::cross_iteration_forward_coefficients)
STOCHNORM_COEFFICIENT_STEP(CrossIterationBackwardStep, cf::cross_iteration_backward_coefficients)
#undef STOCHNORM_COEFFICIENT_STEP

#define ACC_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

// Every op runs on its input's CUDA device. The dispatcher picks this kernel when any tensor
// argument is a CUDA tensor, so the input itself is checked here; the other arguments are
// checked against the input's device where they are read.
void check_cuda_input(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected a CUDA input for the CUDA kernels, got a tensor on ", x.device());
}

at::TensorOptions acc_options(const Tensor& input) {
  return input.options().dtype(common::accumulate_type(input.scalar_type()));
}

// ======================================================================== StochNorm
ForwardResult stoch_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const Tensor& running_mean,
                                 const Tensor& running_var, const std::optional<Tensor>& mask, double eps) {
  constexpr const char* op = "stoch_norm_forward";
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
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
    for_each_index<StochNormForwardStep>(C, a);
  });
  Tensor y = segment_apply(in, center, scale, shift);
  return {y, batch_mean, batch_var, center, invstd};
}

BackwardResult stoch_norm_backward(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
                                   const std::optional<Tensor>& mask, const Tensor& center, const Tensor& invstd) {
  constexpr const char* op = "stoch_norm_backward";
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  common::check_input(input, op);
  const int64_t C = input.size(1);
  const common::SegmentInput in = common::segment_input(input, 1);
  const at::TensorOptions acc = acc_options(input);
  const Tensor w = acc_vector(weight, C, input, op, "weight");
  const Tensor ctr = required_acc_vector(center, C, input, op, "center");
  const Tensor r = required_acc_vector(invstd, C, input, op, "invstd");
  const Tensor m = mask.has_value() && mask->defined() ? bool_arg(*mask, {C}, input, op, "mask") : Tensor();
  auto [sum_dy, sum_dy_xc] = segment_grad_sums(grad_output, in, ctr);
  Tensor k_dy = at::empty({C}, acc), k_x = at::empty({C}, acc), k_0 = at::empty({C}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::StochNormBackward<scalar_t> a{
        ptr_or_null<bool>(m), sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        scalar_t(in.geometry.count()), ptr_or_null<scalar_t>(w), r.const_data_ptr<scalar_t>(),
        k_dy.data_ptr<scalar_t>(), k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>(),
        grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    for_each_index<StochNormBackwardStep>(C, a);
  });
  Tensor grad_input = segment_grad_apply(grad_output, in, ctr, k_dy, k_x, k_0);
  return {grad_input, common::in_weight_dtype(grad_weight, weight), common::in_weight_dtype(grad_bias, weight)};
}

// ======================================================================== BGN
ForwardResult batch_group_norm_forward(const Tensor& input, int64_t num_groups, const std::optional<Tensor>& weight,
                                       const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                                       const std::optional<Tensor>& running_var, bool use_batch_stats, double eps) {
  constexpr const char* op = "batch_group_norm_forward";
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  common::check_input(input, op);
  const int64_t C = input.size(1), G = num_groups, P = common::bgn_pieces(input, G, op);
  const int64_t segments = C * P, segments_per_group = segments / G;
  const common::SegmentInput in = common::segment_input(input, P);
  const at::TensorOptions acc = acc_options(input);
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
    for_each_index<GroupNormForwardStep>(G, group);
    // Same stream: the segment step reads the group tables the step above wrote.
    const cf::GroupNormApply<scalar_t> segment{
        segments_per_group, P, center.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), seg_center.data_ptr<scalar_t>(),
        seg_scale.data_ptr<scalar_t>(), seg_shift.data_ptr<scalar_t>()};
    for_each_index<GroupNormApplyStep>(segments, segment);
  });
  Tensor y = segment_apply(in, seg_center, seg_scale, seg_shift);
  return {y, batch_mean, batch_var, center, invstd};
}

BackwardResult batch_group_norm_backward(const Tensor& grad_output, const Tensor& input, int64_t num_groups,
                                         const std::optional<Tensor>& weight, const Tensor& center,
                                         const Tensor& invstd, bool use_batch_stats) {
  constexpr const char* op = "batch_group_norm_backward";
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
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
  auto [sum_dy, sum_dy_xc] = segment_grad_sums(grad_output, in, seg_center);
  Tensor group_k_x = at::empty({G}, acc), group_k_0 = at::empty({G}, acc);
  Tensor k_dy = at::empty({C, P}, acc), k_x = at::empty({C, P}, acc), k_0 = at::empty({C, P}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::GroupNormBackward<scalar_t> group{
        segments_per_group, P, sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        scalar_t(in.geometry.count() * segments_per_group), use_batch_stats, ptr_or_null<scalar_t>(w),
        group_invstd.const_data_ptr<scalar_t>(), group_k_x.data_ptr<scalar_t>(), group_k_0.data_ptr<scalar_t>()};
    for_each_index<GroupNormBackwardStep>(G, group);
    const cf::GroupNormGradApply<scalar_t> segment{
        segments_per_group, P, ptr_or_null<scalar_t>(w), group_invstd.const_data_ptr<scalar_t>(),
        group_k_x.const_data_ptr<scalar_t>(), group_k_0.const_data_ptr<scalar_t>(), k_dy.data_ptr<scalar_t>(),
        k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>()};
    for_each_index<GroupNormGradApplyStep>(segments, segment);
    const cf::GroupNormParamGrads<scalar_t> channel{
        segments_per_group, P, sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(),
        group_invstd.const_data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    for_each_index<GroupNormParamGradsStep>(C, channel);
  });
  Tensor grad_input = segment_grad_apply(grad_output, in, seg_center, k_dy, k_x, k_0);
  return {grad_input, common::in_weight_dtype(grad_weight, weight), common::in_weight_dtype(grad_bias, weight)};
}

// ======================================================================== CBN
ForwardResult cross_iteration_norm_forward(const Tensor& input, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias,
                                           const std::optional<Tensor>& running_mean,
                                           const std::optional<Tensor>& running_var, const Tensor& past_mean,
                                           const Tensor& past_var, const Tensor& past_keep, bool use_batch_stats,
                                           double eps) {
  constexpr const char* op = "cross_iteration_norm_forward";
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
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
    for_each_index<CrossIterationForwardStep>(C, a);
  });
  Tensor y = segment_apply(in, center, scale, shift);
  return {y, batch_mean, batch_var, center, invstd};
}

BackwardResult cross_iteration_norm_backward(const Tensor& grad_output, const Tensor& input,
                                             const std::optional<Tensor>& weight, const Tensor& center,
                                             const Tensor& invstd, const Tensor& past_keep, bool use_batch_stats) {
  constexpr const char* op = "cross_iteration_norm_backward";
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  common::check_input(input, op);
  const int64_t C = input.size(1);
  const common::SegmentInput in = common::segment_input(input, 1);
  const at::TensorOptions acc = acc_options(input);
  TORCH_CHECK(past_keep.dim() == 2, op, ": past_keep must have shape (K, ", C, "), got ", past_keep.sizes());
  const int64_t K = past_keep.size(0);
  const Tensor keep = bool_arg(past_keep, {K, C}, input, op, "past_keep");
  const Tensor w = acc_vector(weight, C, input, op, "weight");
  const Tensor ctr = required_acc_vector(center, C, input, op, "center");
  const Tensor r = required_acc_vector(invstd, C, input, op, "invstd");
  auto [sum_dy, sum_dy_xc] = segment_grad_sums(grad_output, in, ctr);
  Tensor k_dy = at::empty({C}, acc), k_x = at::empty({C}, acc), k_0 = at::empty({C}, acc);
  Tensor grad_weight = new_output({C}, acc), grad_bias = new_output({C}, acc);
  ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::CrossIterationBackward<scalar_t> a{
        sum_dy.const_data_ptr<scalar_t>(), sum_dy_xc.const_data_ptr<scalar_t>(), scalar_t(in.geometry.count()),
        use_batch_stats, C, K, keep.const_data_ptr<bool>(), ptr_or_null<scalar_t>(w), r.const_data_ptr<scalar_t>(),
        k_dy.data_ptr<scalar_t>(), k_x.data_ptr<scalar_t>(), k_0.data_ptr<scalar_t>(),
        grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>()};
    for_each_index<CrossIterationBackwardStep>(C, a);
  });
  Tensor grad_input = segment_grad_apply(grad_output, in, ctr, k_dy, k_x, k_0);
  return {grad_input, common::in_weight_dtype(grad_weight, weight), common::in_weight_dtype(grad_bias, weight)};
}

// ======================================================================== the core ops
// Thin wrappers registered as stochnorm_ext::segment_*: the statistics and the apply are
// separate ops so that distributed training can all-reduce the partial statistics between them.

std::tuple<Tensor, Tensor> segment_stats_op(const Tensor& input, int64_t pieces) {
  check_cuda_input(input, "segment_stats");
  const c10::cuda::CUDAGuard guard(input.device());
  return segment_stats(common::segment_input(input, pieces));
}

Tensor segment_apply_op(const Tensor& input, const Tensor& center, const Tensor& scale, const Tensor& shift) {
  check_cuda_input(input, "segment_apply");
  const c10::cuda::CUDAGuard guard(input.device());
  return segment_apply(common::segment_input(input, common::pieces_of(input, center)), center, scale, shift);
}

std::tuple<Tensor, Tensor> segment_grad_sums_op(const Tensor& grad_output, const Tensor& input, const Tensor& center) {
  check_cuda_input(input, "segment_grad_sums");
  const c10::cuda::CUDAGuard guard(input.device());
  return segment_grad_sums(grad_output, common::segment_input(input, common::pieces_of(input, center)), center);
}

Tensor segment_grad_apply_op(const Tensor& grad_output, const Tensor& input, const Tensor& center, const Tensor& k_dy,
                             const Tensor& k_x, const Tensor& k_0) {
  check_cuda_input(input, "segment_grad_apply");
  const c10::cuda::CUDAGuard guard(input.device());
  return segment_grad_apply(grad_output, common::segment_input(input, common::pieces_of(input, center)), center, k_dy,
                            k_x, k_0);
}

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, CUDA, m) {
  m.impl("segment_stats", &segment_stats_op);
  m.impl("segment_apply", &segment_apply_op);
  m.impl("segment_grad_sums", &segment_grad_sums_op);
  m.impl("segment_grad_apply", &segment_grad_apply_op);
  m.impl("stoch_norm_forward", &stoch_norm_forward);
  m.impl("stoch_norm_backward", &stoch_norm_backward);
  m.impl("batch_group_norm_forward", &batch_group_norm_forward);
  m.impl("batch_group_norm_backward", &batch_group_norm_backward);
  m.impl("cross_iteration_norm_forward", &cross_iteration_norm_forward);
  m.impl("cross_iteration_norm_backward", &cross_iteration_norm_backward);
}

}  // namespace stochnorm_ext::cuda
