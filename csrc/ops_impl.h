// The device ops of the library (schemas: csrc/ops.cpp), written once for every device:
// the three statistics ops, norm_apply, the one layer-agnostic norm_backward, the four
// segment passes and CBN's two window steps (cbn_window.h: ATen's batched products for the
// dot products, then index steps). Each op is big passes from the device's shared core plus at
// most ONE small coefficient step of coefficients.h (statistics + EMA; backward coefficients;
// the apply pass reads the statistic tables itself). A backend (csrc/cpu/register_cpu.cpp,
// csrc/cuda/register_cuda.cu) describes its device in a struct and registers these templates
// for it with register_kernels<Device>.
//
// Device (static members only):
//   Guard enter(const Tensor& input, const char* op)  checks that the input is on this device
//       and returns what must live for the whole op (CUDA: a CUDAGuard on the input's device)
//   the four passes on SegmentInputs (csrc/cpu/segment_core.h, csrc/cuda/segment_core.h):
//   segment_stats(in, step_count)            per-segment (mean, m2), float64; step_count
//       (num_batches_tracked, or undefined) += 1 by the same launch (one thread)
//   segment_apply(in, ApplyArgs)             y, from per-statistic tables (coefficients.h: ApplyTables)
//   segment_grad_sums(dy, in, center, spg)   per-segment sums, centres per statistic (CenterTable)
//   segment_grad_apply(dy, in, center, spg, k_dy, k_x, k_0)  dx, with (C, P) coefficient tables
//   for_each_index<Step>(n, args)            Step()(i, args) for every i < n, in stream order
//   for_each_unit<Step>(units, members, args) partial / combine / finish of a unit step
// Every use goes through Launch<Device> below, which counts it (common::count_launch): the
// launches per op are a tested fact (tests/test_op_contract.py, tests/test_cuda_backend.py).
//
// Python glue (fake tensors): stochnorm_ext/backend/compiled/ops.py; autograd: csrc/autograd.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cbn_window.h"
#include "coefficients.h"
#include "common.h"
#include "stats_args.h"

namespace stochnorm_ext::ops_impl {

namespace cf = coefficients;
using at::Tensor;
using common::acc_vector;
using common::new_output;
using common::ptr_or_null;

#define STOCHNORM_ACC_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

// The Device abstraction as the ops use it: every pass, step and ATen launch counted once.
template <typename Device>
struct Launch {
  static std::tuple<Tensor, Tensor> stats(const common::SegmentInput& in, const Tensor& step_count = Tensor()) {
    common::count_launch();
    return Device::segment_stats(in, step_count);
  }
  static Tensor apply(const common::SegmentInput& in, const common::ApplyArgs& args) {
    common::count_launch();
    return Device::segment_apply(in, args);
  }
  static std::tuple<Tensor, Tensor> grad_sums(const Tensor& dy, const common::SegmentInput& in, const Tensor& c,
                                              int64_t spg) {
    common::count_launch();
    return Device::segment_grad_sums(dy, in, c, spg);
  }
  static Tensor grad_apply(const Tensor& dy, const common::SegmentInput& in, const Tensor& c, int64_t spg,
                           const Tensor& k_dy, const Tensor& k_x, const Tensor& k_0) {
    common::count_launch();
    return Device::segment_grad_apply(dy, in, c, spg, k_dy, k_x, k_0);
  }
  template <typename Step, typename Args>
  static void each_index(int64_t n, const Args& args) {
    if (n <= 0) return;
    common::count_launch();
    Device::template for_each_index<Step>(n, args);
  }
  template <typename Step, typename Args>
  static void each_unit(int64_t units, int64_t members, const Args& args) {
    if (units <= 0) return;
    common::count_launch();
    Device::template for_each_unit<Step>(units, members, args);
  }
  static void copy_back(const Tensor& dst, const Tensor& src) {
    common::count_launch();
    dst.copy_(src);
  }
};

inline at::TensorOptions acc_options(const Tensor& input) {
  return input.options().dtype(common::accumulate_type(input.scalar_type()));
}

// ======================================================================== statistics ops
// Checks first (nothing is mutated before every check has passed), then: the stats pass, which
// also counts the step (num_batches_tracked += 1, before the coefficient step reads it), and
// ONE coefficient step that also does the EMA in place.

template <typename Device>
std::tuple<Tensor, Tensor, Tensor> stoch_norm_stats(const Tensor& input, const Tensor& running_mean,
                                                    const Tensor& running_var, const Tensor& mask,
                                                    std::optional<double> momentum,
                                                    const std::optional<Tensor>& num_batches_tracked,
                                                    bool update_stats) {
  constexpr const char* op = "stoch_norm_stats";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1), M = input.numel() / C;
  const common::SegmentInput in = common::segment_input(input, 1);
  const Tensor m = common::bool_arg(mask, {C}, input, op, "mask");
  StatsArgs args(input, running_mean, running_var, C, momentum, num_batches_tracked, update_stats, true, op);
  const at::TensorOptions acc = acc_options(input);
  Tensor center = new_output({C}, acc), var = new_output({C}, acc), red = new_output({C}, acc);
  auto [seg_mean, seg_m2] = Launch<Device>::stats(in, args.step_count);
  STOCHNORM_ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::StochNormStats<scalar_t> a{seg_mean.template const_data_ptr<double>(),
                                         seg_m2.template const_data_ptr<double>(),
                                         scalar_t(M),
                                         m.const_data_ptr<bool>(),
                                         args.rm.template const_data_ptr<scalar_t>(),
                                         args.rv.template const_data_ptr<scalar_t>(),
                                         args.template update_args<scalar_t>(M),
                                         {center.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
                                          red.data_ptr<scalar_t>()}};
    Launch<Device>::template each_index<cf::StochNormStatsStep>(C, a);
  });
  args.template after_step<Launch<Device>>();
  return {center, var, red};
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor> batch_group_norm_stats(const Tensor& input, int64_t num_groups,
                                                          const std::optional<Tensor>& running_mean,
                                                          const std::optional<Tensor>& running_var,
                                                          std::optional<double> momentum,
                                                          const std::optional<Tensor>& num_batches_tracked,
                                                          bool update_stats) {
  constexpr const char* op = "batch_group_norm_stats";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1), G = num_groups, P = common::bgn_pieces(input, G, op);
  const int64_t spg = C * P / G, M = input.numel() / G;
  const common::SegmentInput in = common::segment_input(input, P);
  StatsArgs args(input, running_mean.value_or(Tensor()), running_var.value_or(Tensor()), G, momentum,
                 num_batches_tracked, update_stats, false, op);
  const at::TensorOptions acc = acc_options(input);
  Tensor center = new_output({G}, acc), var = new_output({G}, acc), red = new_output({G}, acc);
  auto [seg_mean, seg_m2] = Launch<Device>::stats(in, args.step_count);
  STOCHNORM_ACC_DISPATCH(acc.dtype().toScalarType(), op, [&] {
    const cf::BatchGroupNormStats<scalar_t> a{spg,
                                              seg_mean.template const_data_ptr<double>(),
                                              seg_m2.template const_data_ptr<double>(),
                                              double(in.geometry.count()),
                                              scalar_t(M),
                                              args.template update_args<scalar_t>(M),
                                              {center.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
                                               red.data_ptr<scalar_t>()}};
    Launch<Device>::template each_unit<cf::BatchGroupNormStatsStep>(G, spg, a);
  });
  args.template after_step<Launch<Device>>();
  return {center, var, red};
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cross_iteration_norm_stats(
    const Tensor& input, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const Tensor& past_mean, const Tensor& past_var, const Tensor& past_keep, std::optional<double> momentum,
    const std::optional<Tensor>& num_batches_tracked, bool update_stats) {
  constexpr const char* op = "cross_iteration_norm_stats";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  common::check_input(input, op);
  const int64_t C = input.size(1), M = input.numel() / C;
  const common::SegmentInput in = common::segment_input(input, 1);
  const at::TensorOptions acc = acc_options(input);
  TORCH_CHECK(past_mean.dim() == 2 && past_mean.size(1) == C && past_var.sizes() == past_mean.sizes(), op,
              ": past_mean and past_var must have shape (K, ", C, "), got ", past_mean.sizes(), " and ", past_var.sizes());
  TORCH_CHECK(past_mean.device() == input.device() && past_var.device() == input.device(), op,
              ": past_mean and past_var are on ", past_mean.device(), " and ", past_var.device(),
              " but the input is on ", input.device());
  const int64_t K = past_mean.size(0);
  const Tensor keep = common::bool_arg(past_keep, {K, C}, input, op, "past_keep");
  const at::ScalarType acc_type = acc.dtype().toScalarType();
  const Tensor p_mean = common::dense_as(past_mean, acc_type), p_var = common::dense_as(past_var, acc_type);
  StatsArgs args(input, running_mean.value_or(Tensor()), running_var.value_or(Tensor()), C, momentum,
                 num_batches_tracked, update_stats, false, op);
  Tensor mu_t = new_output({C}, acc), var_t = new_output({C}, acc);
  Tensor center = new_output({C}, acc), var = new_output({C}, acc), red = new_output({C}, acc);
  auto [seg_mean, seg_m2] = Launch<Device>::stats(in, args.step_count);
  STOCHNORM_ACC_DISPATCH(acc_type, op, [&] {
    const cf::CrossIterationStats<scalar_t> a{seg_mean.template const_data_ptr<double>(),
                                              seg_m2.template const_data_ptr<double>(),
                                              scalar_t(M),
                                              C,
                                              K,
                                              p_mean.const_data_ptr<scalar_t>(),
                                              p_var.const_data_ptr<scalar_t>(),
                                              keep.const_data_ptr<bool>(),
                                              mu_t.data_ptr<scalar_t>(),
                                              var_t.data_ptr<scalar_t>(),
                                              args.template update_args<scalar_t>(M),
                                              {center.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
                                               red.data_ptr<scalar_t>()}};
    Launch<Device>::template each_index<cf::CrossIterationStatsStep>(C, a);
  });
  args.template after_step<Launch<Device>>();
  return {mu_t, var_t, center, var, red};
}

// ======================================================================== apply and backward
// The statistic tables (G,) of norm_apply / norm_backward and the grouping they imply; the
// passes read them per segment themselves (one launch for the apply, none between).
struct Grouping {
  int64_t C, G, P, spg;  // channels, statistics, pieces per channel, segments per statistic
};

inline Grouping grouping(const Tensor& input, int64_t num_groups, const char* op) {
  common::check_input(input, op);
  const int64_t C = input.size(1), P = common::bgn_pieces(input, num_groups, op);
  return {C, num_groups, P, C * P / num_groups};
}

template <typename Device>
Tensor norm_apply(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                  const Tensor& center, const Tensor& var, const std::optional<Tensor>& red, int64_t num_groups,
                  double eps) {
  constexpr const char* op = "norm_apply";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  const Grouping g = grouping(input, num_groups, op);
  const common::SegmentInput in = common::segment_input(input, g.P);
  const Tensor w = acc_vector(weight, g.C, input, op, "weight"), b = acc_vector(bias, g.C, input, op, "bias");
  const Tensor ctr = common::required_acc_vector(center, g.G, input, op, "center");
  const Tensor v = common::required_acc_vector(var, g.G, input, op, "var");
  acc_vector(red, g.G, input, op, "red");  // checked only: the forward does not read it
  return Launch<Device>::apply(in, common::ApplyArgs{ctr, v, w, b, g.spg, g.P, eps});
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor> norm_backward(const Tensor& grad_output, const Tensor& input,
                                                 const std::optional<Tensor>& weight, const Tensor& center,
                                                 const Tensor& var, const std::optional<Tensor>& red,
                                                 int64_t num_groups, double eps, std::array<bool, 3> output_mask) {
  constexpr const char* op = "norm_backward";
  [[maybe_unused]] const auto guard = Device::enter(input, op);
  const Grouping g = grouping(input, num_groups, op);
  const common::SegmentInput in = common::segment_input(input, g.P);
  const at::TensorOptions acc = acc_options(input);
  const at::ScalarType acc_type = acc.dtype().toScalarType();
  const Tensor w = acc_vector(weight, g.C, input, op, "weight");
  const Tensor ctr = common::required_acc_vector(center, g.G, input, op, "center");
  const Tensor v = common::required_acc_vector(var, g.G, input, op, "var");
  const Tensor r = acc_vector(red, g.G, input, op, "red");
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  // dy dense in x's layout once (e.g. the expanded gradient of y.sum()), not once per pass.
  const Tensor dy = common::same_layout(grad_output, in);
  // The sums are needed by the parameter gradients and by the reduction terms (red given).
  Tensor sum_dy, sum_dy_xc;
  if (need_w || need_b || (need_x && r.defined())) {
    std::tie(sum_dy, sum_dy_xc) = Launch<Device>::grad_sums(dy, in, ctr, g.spg);
  }
  Tensor k_dy, k_x, k_0;
  if (need_x) k_dy = at::empty({g.C, g.P}, acc), k_x = at::empty({g.C, g.P}, acc), k_0 = at::empty({g.C, g.P}, acc);
  Tensor grad_weight = new_output({need_w ? g.C : 0}, acc), grad_bias = new_output({need_b ? g.C : 0}, acc);
  if (need_x || need_w || need_b) {
    STOCHNORM_ACC_DISPATCH(acc_type, op, [&] {
      const cf::NormBackward<scalar_t> a{g.spg,
                                         g.P,
                                         ptr_or_null<scalar_t>(sum_dy),
                                         ptr_or_null<scalar_t>(sum_dy_xc),
                                         ptr_or_null<scalar_t>(w),
                                         v.const_data_ptr<scalar_t>(),
                                         ptr_or_null<scalar_t>(r),
                                         scalar_t(eps),
                                         common::mutable_ptr_or_null<scalar_t>(k_dy),
                                         common::mutable_ptr_or_null<scalar_t>(k_x),
                                         common::mutable_ptr_or_null<scalar_t>(k_0),
                                         common::mutable_ptr_or_null<scalar_t>(grad_weight),
                                         common::mutable_ptr_or_null<scalar_t>(grad_bias)};
      // P > 1: one unit per channel over its pieces; else one per statistic over its channels.
      if (g.P > 1) {
        Launch<Device>::template each_unit<cf::NormBackwardStep<scalar_t>>(g.C, g.P, a);
      } else {
        Launch<Device>::template each_unit<cf::NormBackwardStep<scalar_t>>(g.G, g.spg, a);
      }
    });
  }
  Tensor grad_input = need_x ? Launch<Device>::grad_apply(dy, in, ctr, g.spg, k_dy, k_x, k_0)
                             : at::empty({0}, input.options());
  return {grad_input, common::in_weight_dtype(grad_weight, weight), common::in_weight_dtype(grad_bias, weight)};
}

#undef STOCHNORM_ACC_DISPATCH

// ======================================================================== CBN's window
// The two window steps of csrc/cbn_window.h, each one op: the window's tensors (the fields of
// stochnorm_ext.cbn_window.CBNWindow) as the module holds them.

// A window tensor a step reads or writes through a raw pointer: itself when dense in `dtype`,
// else a converted copy (written back after the step when the step writes it).
struct WindowTensor {
  Tensor work, buf;
  WindowTensor(const Tensor& t, at::ScalarType dtype) : work(common::dense_as(t, dtype)), buf(t) {}
  template <typename Launch>
  void write_back() const {
    if (!work.is_same(buf)) Launch::copy_back(buf, work);
  }
};

// The window's shape, checked against every field and the conv weight (C, Cin/Gc, kh, kw).
struct WindowShape {
  int64_t slots, channels, groups, weights;  // K, C, Gc, I
  at::ScalarType dtype;  // the window's arithmetic: float64 for a float64 window, else float32
};

// `head`: checked with the others when given (the store writes it; the compensation does not read it).
inline WindowShape check_window(const Tensor& mean, const Tensor& var, const Tensor& dmu, const Tensor& dvar,
                                const Tensor& dmu_w, const Tensor& dvar_w, const Tensor& valid, const Tensor& step,
                                const Tensor& conv_weight, const char* op, const Tensor& head = Tensor()) {
  TORCH_CHECK(mean.dim() == 2 && dmu.dim() == 3 && dvar.dim() == 3, op,
              ": the window's mean must be (K, C), dmu (K, Gc, I) and dvar (K, C, I), got ", mean.sizes(), ", ",
              dmu.sizes(), " and ", dvar.sizes());
  const int64_t K = mean.size(0), C = mean.size(1), G = dmu.size(1), I = dvar.size(2);
  TORCH_CHECK(var.sizes() == mean.sizes() && dmu_w.sizes() == mean.sizes() && dvar_w.sizes() == mean.sizes() &&
                  dmu.size(0) == K && dmu.size(2) == I && dvar.size(0) == K && dvar.size(1) == C &&
                  valid.dim() == 1 && valid.size(0) == K && step.numel() == 1,
              op, ": the window's fields disagree on its shape (mean ", mean.sizes(), ", var ", var.sizes(), ", dmu ",
              dmu.sizes(), ", dvar ", dvar.sizes(), ", dmu_w ", dmu_w.sizes(), ", dvar_w ", dvar_w.sizes(), ", valid ",
              valid.sizes(), ", step ", step.sizes(), ")");
  if (head.defined()) {
    TORCH_CHECK(head.numel() == 1 && head.scalar_type() == at::kLong && head.device() == mean.device(), op,
                ": window.head must be a one-element int64 tensor on ", mean.device(), ", got ", head.scalar_type(),
                " of shape ", head.sizes(), " on ", head.device());
  }
  TORCH_CHECK(G > 0 && C % G == 0 && conv_weight.dim() == 4 && conv_weight.size(0) == C &&
                  conv_weight.numel() == C * I,
              op, ": a conv weight of shape (", C, ", ", I, " weights) with ", G, " groups was expected, got ",
              conv_weight.sizes());
  for (const auto& [t, name] : {std::pair{var, "var"}, std::pair{dmu, "dmu"}, std::pair{dvar, "dvar"},
                                std::pair{dmu_w, "dmu_w"}, std::pair{dvar_w, "dvar_w"}, std::pair{valid, "valid"},
                                std::pair{step, "step"}, std::pair{conv_weight, "conv_weight"}}) {
    TORCH_CHECK(t.device() == mean.device(), op, ": window.", name, " is on ", t.device(), " but window.mean is on ",
                mean.device());
  }
  TORCH_CHECK(valid.scalar_type() == at::kBool && step.scalar_type() == at::kLong, op,
              ": window.valid must be bool and window.step int64, got ", valid.scalar_type(), " and ",
              step.scalar_type());
  for (const auto& [t, name] : {std::pair{mean, "mean"}, std::pair{var, "var"}, std::pair{dmu, "dmu"},
                                std::pair{dvar, "dvar"}, std::pair{dmu_w, "dmu_w"}, std::pair{dvar_w, "dvar_w"},
                                std::pair{conv_weight, "conv_weight"}}) {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": window.", name, " must be floating point, got ",
                t.scalar_type());
  }
  return {K, C, G, I, mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat};
}

// <dmu_k, W_c> and <dvar_k, W_c> as (C, K) tables in the window's dtype, for Jacobians
// dmu (K, Gc, I) and dvar (K, C, I) (dmu_k of group g pairs with the channels of group g):
// two batched matrix products that read W and the slots where they lie, as
// stochnorm_ext.cbn_window._window_dots takes them (the same products: the same values).
inline std::pair<Tensor, Tensor> window_dots(const Tensor& dmu, const Tensor& dvar, const Tensor& weight,
                                             const WindowShape& w) {
  common::count_launch(2);  // two ATen products
  // In the window's dtype whatever autocast region the op was called in.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t K = dmu.size(0);
  const Tensor rows = weight.reshape({w.channels, w.weights});
  const Tensor mu = at::bmm(rows.reshape({w.groups, w.channels / w.groups, w.weights}), dmu.permute({1, 2, 0}));
  const Tensor var = at::bmm(rows.reshape({w.channels, 1, w.weights}), dvar.permute({1, 2, 0}));
  return {mu.reshape({w.channels, K}), var.reshape({w.channels, K})};
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor> cbn_window_compensate(const Tensor& mean, const Tensor& var, const Tensor& dmu,
                                                         const Tensor& dvar, const Tensor& dmu_w,
                                                         const Tensor& dvar_w, const Tensor& valid,
                                                         const Tensor& step, const Tensor& conv_weight, double rho,
                                                         int64_t burnin) {
  constexpr const char* op = "cbn_window_compensate";
  [[maybe_unused]] const auto guard = Device::enter(mean, op);
  const WindowShape w = check_window(mean, var, dmu, dvar, dmu_w, dvar_w, valid, step, conv_weight, op);
  const at::TensorOptions f64 = mean.options().dtype(at::kDouble);
  Tensor past_mean = new_output({w.slots, w.channels}, f64), past_var = new_output({w.slots, w.channels}, f64);
  Tensor keep = new_output({w.slots, w.channels}, mean.options().dtype(at::kBool));
  const WindowTensor m(mean, w.dtype), v(var, w.dtype), dm(dmu_w, at::kDouble), dv(dvar_w, at::kDouble),
      ok(valid, at::kBool);
  const auto [mu_dots, var_dots] = window_dots(common::dense_as(dmu, w.dtype), common::dense_as(dvar, w.dtype),
                                                       common::dense_as(conv_weight, w.dtype), w);
  AT_DISPATCH_FLOATING_TYPES(w.dtype, op, [&] {
    const cbn_window::Compensate<scalar_t> a{w.channels,
                                             w.slots,
                                             m.work.const_data_ptr<scalar_t>(),
                                             v.work.const_data_ptr<scalar_t>(),
                                             mu_dots.const_data_ptr<scalar_t>(),
                                             var_dots.const_data_ptr<scalar_t>(),
                                             dm.work.const_data_ptr<double>(),
                                             dv.work.const_data_ptr<double>(),
                                             ok.work.const_data_ptr<bool>(),
                                             step.const_data_ptr<int64_t>(),
                                             burnin,
                                             rho,
                                             past_mean.data_ptr<double>(),
                                             past_var.data_ptr<double>(),
                                             keep.data_ptr<bool>()};
    Launch<Device>::template each_index<cbn_window::CompensateStep>(w.slots * w.channels, a);
  });
  return {past_mean, past_var, keep};
}

template <typename Device>
void cbn_window_store(const Tensor& mean, const Tensor& var, const Tensor& dmu, const Tensor& dvar,
                      const Tensor& dmu_w, const Tensor& dvar_w, const Tensor& valid, const Tensor& head,
                      const Tensor& step, const Tensor& mu_t, const Tensor& var_t, const Tensor& new_dmu,
                      const Tensor& new_dvar, const Tensor& conv_weight, const std::optional<Tensor>& dots_mean,
                      const std::optional<Tensor>& dots_var, int64_t burnin) {
  constexpr const char* op = "cbn_window_store";
  [[maybe_unused]] const auto guard = Device::enter(mean, op);
  const WindowShape w = check_window(mean, var, dmu, dvar, dmu_w, dvar_w, valid, step, conv_weight, op, head);
  const int64_t C = w.channels, G = w.groups, I = w.weights;
  TORCH_CHECK(w.slots > 0, op, ": a window of 0 slots (window=1) stores nothing");
  TORCH_CHECK(mu_t.numel() == C && var_t.numel() == C && new_dmu.numel() == G * I && new_dvar.numel() == C * I, op,
              ": the entry must have C = ", C, " statistics and Jacobians of ", G, " x ", I, " and ", C, " x ", I,
              " values, got ", mu_t.sizes(), ", ", var_t.sizes(), ", ", new_dmu.sizes(), " and ", new_dvar.sizes());
  TORCH_CHECK(dots_mean.has_value() == dots_var.has_value(), op, ": dots_mean and dots_var must be given together");
  for (const Tensor& t : {mu_t, var_t, new_dmu, new_dvar}) {
    TORCH_CHECK(t.device() == mean.device(), op, ": the entry is on ", t.device(), " but the window is on ",
                mean.device());
  }
  const Tensor nm = common::dense_as(new_dmu, w.dtype), nv = common::dense_as(new_dvar, w.dtype);
  // <dmu, W(tau)>, <dvar, W(tau)>: the products compensate takes later, unless given (float64).
  Tensor products_mean, products_var, d_mean, d_var;
  if (dots_mean.has_value()) {
    d_mean = common::dense_as(*dots_mean, at::kDouble), d_var = common::dense_as(*dots_var, at::kDouble);
    TORCH_CHECK(d_mean.numel() == C && d_var.numel() == C, op, ": dots_mean and dots_var must have ", C,
                " values, got ", d_mean.sizes(), " and ", d_var.sizes());
  } else {
    std::tie(products_mean, products_var) =
        window_dots(nm.view({1, G, I}), nv.view({1, C, I}), common::dense_as(conv_weight, w.dtype), w);
  }
  const WindowTensor m(mean, w.dtype), v(var, w.dtype), jm(dmu, w.dtype), jv(dvar, w.dtype);
  const WindowTensor dm(dmu_w, at::kDouble), dv(dvar_w, at::kDouble), ok(valid, at::kBool);
  const Tensor mu = common::dense_as(mu_t, w.dtype), vt = common::dense_as(var_t, w.dtype);
  // The Jacobian rows into the head slot (read on the device: no host sync); during the
  // burn-in the slot is rewritten with itself.
  const Tensor slot = head.reshape({1});
  for (const auto& [buf, rows] : {std::pair{jm.work, nm.view({1, G, I})}, std::pair{jv.work, nv.view({1, C, I})}}) {
    common::count_launch(burnin > 0 ? 4 : 1);
    buf.index_copy_(0, slot, burnin > 0 ? at::where(step.reshape({1, 1, 1}) >= burnin, rows, buf.index_select(0, slot))
                                        : rows);
  }
  AT_DISPATCH_FLOATING_TYPES(w.dtype, op, [&] {
    const cbn_window::Store<scalar_t> a{C,
                                        w.slots,
                                        m.work.data_ptr<scalar_t>(),
                                        v.work.data_ptr<scalar_t>(),
                                        dm.work.data_ptr<double>(),
                                        dv.work.data_ptr<double>(),
                                        ok.work.data_ptr<bool>(),
                                        head.data_ptr<int64_t>(),
                                        step.data_ptr<int64_t>(),
                                        burnin,
                                        mu.const_data_ptr<scalar_t>(),
                                        vt.const_data_ptr<scalar_t>(),
                                        ptr_or_null<scalar_t>(products_mean),
                                        ptr_or_null<scalar_t>(products_var),
                                        ptr_or_null<double>(d_mean),
                                        ptr_or_null<double>(d_var)};
    Launch<Device>::template each_index<cbn_window::StoreStep>(C, a);
    Launch<Device>::template each_index<cbn_window::AdvanceStep>(1, a);
  });
  for (const WindowTensor* t : {&m, &v, &jm, &jv, &dm, &dv, &ok}) t->template write_back<Launch<Device>>();
}

// ======================================================================== the segment passes
// Thin wrappers registered as stochnorm_ext::segment_*: the distributed sync path composes them
// with collectives (all-reduce of the per-segment statistics and backward sums in between).

template <typename Device>
std::tuple<Tensor, Tensor> segment_stats_op(const Tensor& input, int64_t pieces) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_stats");
  return Launch<Device>::stats(common::segment_input(input, pieces));
}

// The per-segment tables given as they are: one entry per segment (spg = P = 1 in the
// tables' indexing), scale and shift as weight and bias (coefficients::ApplyTables).
template <typename Device>
Tensor segment_apply_op(const Tensor& input, const Tensor& center, const Tensor& scale, const Tensor& shift) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_apply");
  const common::SegmentInput in = common::segment_input(input, common::pieces_of(input, center));
  const Tensor c = common::table_arg(center, in, "center"), a = common::table_arg(scale, in, "scale"),
               b = common::table_arg(shift, in, "shift");
  return Launch<Device>::apply(in, common::ApplyArgs{c, Tensor(), a, b, 1, 1, 0.0});
}

template <typename Device>
std::tuple<Tensor, Tensor> segment_grad_sums_op(const Tensor& grad_output, const Tensor& input, const Tensor& center) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_grad_sums");
  const common::SegmentInput in = common::segment_input(input, common::pieces_of(input, center));
  return Launch<Device>::grad_sums(grad_output, in, common::table_arg(center, in, "center"), 1);
}

template <typename Device>
Tensor segment_grad_apply_op(const Tensor& grad_output, const Tensor& input, const Tensor& center, const Tensor& k_dy,
                             const Tensor& k_x, const Tensor& k_0) {
  [[maybe_unused]] const auto guard = Device::enter(input, "segment_grad_apply");
  const common::SegmentInput in = common::segment_input(input, common::pieces_of(input, center));
  return Launch<Device>::grad_apply(grad_output, in, common::table_arg(center, in, "center"), 1,
                                    common::table_arg(k_dy, in, "k_dy"), common::table_arg(k_x, in, "k_x"),
                                    common::table_arg(k_0, in, "k_0"));
}

// Every device op of the library (schemas: csrc/ops.cpp), for one device.
template <typename Device>
void register_kernels(torch::Library& m) {
  m.impl("segment_stats", &segment_stats_op<Device>);
  m.impl("segment_apply", &segment_apply_op<Device>);
  m.impl("segment_grad_sums", &segment_grad_sums_op<Device>);
  m.impl("segment_grad_apply", &segment_grad_apply_op<Device>);
  m.impl("stoch_norm_stats", &stoch_norm_stats<Device>);
  m.impl("batch_group_norm_stats", &batch_group_norm_stats<Device>);
  m.impl("cross_iteration_norm_stats", &cross_iteration_norm_stats<Device>);
  m.impl("norm_apply", &norm_apply<Device>);
  m.impl("norm_backward", &norm_backward<Device>);
  m.impl("cbn_window_compensate", &cbn_window_compensate<Device>);
  m.impl("cbn_window_store", &cbn_window_store<Device>);
}

}  // namespace stochnorm_ext::ops_impl
