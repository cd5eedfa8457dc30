// Autograd of the library's ops, in C++ (as torchvision registers its ops'): at the small
// batches these layers exist for, a training step is bound by host time, and a Python
// register_autograd formula costs several times the op itself (docs/DESIGN.md has the figures).
//
//  - norm_apply: a torch::autograd::Function whose backward is norm_backward (the statistics'
//    dependence on x travels through `red`); differentiable in input, weight, bias.
//  - norm_backward: a Function whose own backward refuses (no double backward).
//  - the statistics ops: not differentiable. They run below autograd (outputs never require
//    grad) and bump the version counters of the tensors they mutated, like any in-place op.
//
// Every kernel calls the op through the dispatcher below autograd, so the device kernels,
// the fake implementations (torch.compile, opcheck) and functionalization all see it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

namespace stochnorm_ext::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using NormBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                           const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                           int64_t, double, std::array<bool, 3>);
using NormApplySig = Tensor(const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
                            const Tensor&, const std::optional<Tensor>&, int64_t, double);

std::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// ------------------------------------------------------------------------------ norm_backward
class NormBackwardFunction : public torch::autograd::Function<NormBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input,
                               const std::optional<Tensor>& weight, const Tensor& center, const Tensor& var,
                               const std::optional<Tensor>& red, int64_t num_groups, double eps,
                               std::array<bool, 3> output_mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<NormBackwardSig>("stochnorm_ext::norm_backward");
    auto [dx, dw, db] = op.call(grad_output, input, weight, center, var, red, num_groups, eps, output_mask);
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false,
                "stochnorm_ext: double backward (differentiating norm_backward) is not supported; the layers' "
                "gradients are computed by fused kernels that have no derivative of their own. Use the reference "
                "backend (backend='reference') if you need second derivatives.");
  }
};

std::tuple<Tensor, Tensor, Tensor> norm_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                                          const std::optional<Tensor>& weight, const Tensor& center,
                                                          const Tensor& var, const std::optional<Tensor>& red,
                                                          int64_t num_groups, double eps,
                                                          std::array<bool, 3> output_mask) {
  auto out = NormBackwardFunction::apply(grad_output, input, weight, center, var, red, num_groups, eps, output_mask);
  return {out[0], out[1], out[2]};
}

// ------------------------------------------------------------------------------ norm_apply
class NormApplyFunction : public torch::autograd::Function<NormApplyFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const Tensor& center, const Tensor& var,
                        const std::optional<Tensor>& red, int64_t num_groups, double eps) {
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      static const auto op = op_handle<NormApplySig>("stochnorm_ext::norm_apply");
      y = op.call(input, weight, bias, center, var, red, num_groups, eps);
    }
    // center / var / red are constants to autograd: red carries the statistics' dependence on x.
    ctx->save_for_backward({input, weight.value_or(Tensor()), center, var, red.value_or(Tensor())});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] =
        bias.has_value() && bias->defined() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_y = grads[0];
    variable_list out(8);  // one entry per forward argument
    if (!grad_y.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    // Through the dispatcher (and norm_backward's autograd kernel): create_graph=True then
    // differentiating these gradients raises the double-backward error.
    static const auto op = op_handle<NormBackwardSig>("stochnorm_ext::norm_backward");
    auto [dx, dw, db] = op.call(grad_y, saved[0], optional_of(saved[1]), saved[2], saved[3], optional_of(saved[4]),
                                ctx->saved_data["num_groups"].toInt(), ctx->saved_data["eps"].toDouble(), mask);
    if (mask[0]) out[0] = dx;
    if (mask[1]) out[1] = dw;
    if (mask[2]) {
      const c10::IValue& bias_dtype = ctx->saved_data["bias_dtype"];
      out[2] = bias_dtype.isNone() || db.scalar_type() == bias_dtype.toScalarType() ? db
                                                                                   : db.to(bias_dtype.toScalarType());
    }
    return out;
  }
};

Tensor norm_apply_autograd(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                           const Tensor& center, const Tensor& var, const std::optional<Tensor>& red,
                           int64_t num_groups, double eps) {
  return NormApplyFunction::apply(input, weight, bias, center, var, red, num_groups, eps);
}

// ------------------------------------------------------------------------------ statistics ops
void bump(const Tensor& t) {
  if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
}

void bump(const std::optional<Tensor>& t) {
  if (t.has_value()) bump(*t);
}

// A statistics op, called below autograd: its outputs never require grad.
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

// What a statistics op mutates when it updates: the running statistics and the step count.
template <typename Mean, typename Var>
void bump_all(const Mean& running_mean, const Var& running_var, const std::optional<Tensor>& num_batches_tracked) {
  bump(running_mean);
  bump(running_var);
  bump(num_batches_tracked);
}

using StochNormStatsSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, std::optional<double>,
                                                             const std::optional<Tensor>&, bool);

std::tuple<Tensor, Tensor, Tensor> stoch_norm_stats_autograd(const Tensor& input, const Tensor& running_mean,
                                                             const Tensor& running_var, const Tensor& mask,
                                                             std::optional<double> momentum,
                                                             const std::optional<Tensor>& num_batches_tracked,
                                                             bool update_stats) {
  static const auto op = op_handle<StochNormStatsSig>("stochnorm_ext::stoch_norm_stats");
  auto out =
      call_below_autograd(op, input, running_mean, running_var, mask, momentum, num_batches_tracked, update_stats);
  if (update_stats) bump_all(running_mean, running_var, num_batches_tracked);
  return out;
}

using BatchGroupNormStatsSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t,
                                                                  const std::optional<Tensor>&,
                                                                  const std::optional<Tensor>&, std::optional<double>,
                                                                  const std::optional<Tensor>&, bool);

std::tuple<Tensor, Tensor, Tensor> batch_group_norm_stats_autograd(
    const Tensor& input, int64_t num_groups, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, std::optional<double> momentum,
    const std::optional<Tensor>& num_batches_tracked, bool update_stats) {
  static const auto op = op_handle<BatchGroupNormStatsSig>("stochnorm_ext::batch_group_norm_stats");
  auto out = call_below_autograd(op, input, num_groups, running_mean, running_var, momentum, num_batches_tracked,
                                 update_stats);
  if (update_stats) bump_all(running_mean, running_var, num_batches_tracked);
  return out;
}

using CrossIterationStatsSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
    const Tensor&, std::optional<double>, const std::optional<Tensor>&, bool);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cross_iteration_norm_stats_autograd(
    const Tensor& input, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const Tensor& past_mean, const Tensor& past_var, const Tensor& past_keep, std::optional<double> momentum,
    const std::optional<Tensor>& num_batches_tracked, bool update_stats) {
  static const auto op = op_handle<CrossIterationStatsSig>("stochnorm_ext::cross_iteration_norm_stats");
  auto out = call_below_autograd(op, input, running_mean, running_var, past_mean, past_var, past_keep, momentum,
                                 num_batches_tracked, update_stats);
  if (update_stats) bump_all(running_mean, running_var, num_batches_tracked);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, Autograd, m) {
  m.impl("norm_apply", &norm_apply_autograd);
  m.impl("norm_backward", &norm_backward_autograd);
  m.impl("stoch_norm_stats", &stoch_norm_stats_autograd);
  m.impl("batch_group_norm_stats", &batch_group_norm_stats_autograd);
  m.impl("cross_iteration_norm_stats", &cross_iteration_norm_stats_autograd);
}

}  // namespace stochnorm_ext::autograd
