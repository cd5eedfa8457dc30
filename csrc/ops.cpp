// The stochnorm_ext operator library: op schemas live here (TORCH_LIBRARY), kernels register
// per dispatch key from csrc/cpu/ (and csrc/cuda/) with TORCH_LIBRARY_IMPL. Fake (meta)
// implementations and autograd formulas are registered from Python: stochnorm_ext/_ops.py.
//
// Tables ("(C, P)") are in the accumulation type: float32, or float64 for float64 input.
// A segment is the set of values one statistic covers inside one channel: the whole channel,
// or for BGN with G = P * C one of the P pieces of its flattened positions (see
// csrc/coefficients.h). The forward centred form is y = (x - center) * scale + shift, the
// backward one dx = k_dy * dy + k_x * (x - center) + k_0.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

// Importing stochnorm_ext._C loads this shared library, which runs the registrations
// below; no Python functions are exported, so no pybind11 is needed. PyMODINIT_FUNC makes
// the entry point extern "C" and visible despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace stochnorm_ext {
namespace {

// BatchNorm's running-statistics update, the same for every layer and device (tiny (C,) or
// (G,) tensors, ATen ops): the running variance takes the unbiased batch variance
// var * count / (count - 1). `momentum` is the update factor itself.
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                          const at::Tensor& batch_var, int64_t count, double momentum) {
  TORCH_CHECK(count > 1, "update_running_stats: the unbiased variance needs more than 1 value per statistic, got ",
              count);
  TORCH_CHECK(running_mean.sizes() == batch_mean.sizes() && running_var.sizes() == batch_var.sizes() &&
                  running_mean.sizes() == running_var.sizes(),
              "update_running_stats: expected running and batch statistics of one shape, got ", running_mean.sizes(),
              ", ", running_var.sizes(), ", ", batch_mean.sizes(), ", ", batch_var.sizes());
  const at::Tensor unbiased_var = batch_var * (double(count) / double(count - 1));
  running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.scalar_type()), momentum);
  running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.scalar_type()), momentum);
}

}  // namespace
}  // namespace stochnorm_ext

TORCH_LIBRARY(stochnorm_ext, m) {
  // ---- The shared core: statistics, apply, backward sums, backward apply (per segment).
  // (C, P) mean and m2 (sum of squared deviations) of each segment; N * S / P values each.
  // float64 for every input dtype, so that segments can be merged at a large common offset.
  m.def("segment_stats(Tensor input, int pieces) -> (Tensor mean, Tensor m2)");
  // y = (x - center) * scale + shift with (C, P) (or (C,)) tables; y keeps x's memory format.
  m.def("segment_apply(Tensor input, Tensor center, Tensor scale, Tensor shift) -> Tensor");
  // (C, P) sums of dy and of dy * (x - center).
  m.def("segment_grad_sums(Tensor grad_output, Tensor input, Tensor center) -> (Tensor sum_dy, Tensor sum_dy_xc)");
  // dx = k_dy * dy + k_x * (x - center) + k_0.
  m.def("segment_grad_apply(Tensor grad_output, Tensor input, Tensor center, Tensor k_dy, Tensor k_x, "
        "Tensor k_0) -> Tensor");
  // BatchNorm's EMA of the running statistics, in place.
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor batch_mean, "
        "Tensor batch_var, int count, float momentum) -> ()");

  // ---- The layers. Forward ops are functional (the caller applies update_running_stats with
  // the returned batch statistics), so that autograd can be registered on them; they return
  // the output, the biased batch statistics (empty when none were computed) and the
  // statistics each channel/group was normalised with (center, invstd), which backward takes.
  // StochNorm: mask (C,) bool, True = batch statistics; no mask = eval (running statistics).
  m.def("stoch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, Tensor? mask, float eps) "
        "-> (Tensor output, Tensor batch_mean, Tensor batch_var, Tensor center, Tensor invstd)");
  m.def("stoch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? mask, Tensor center, "
        "Tensor invstd) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // BGN: statistics per group (G,), affine per channel; use_batch_stats=False normalises
  // with the running statistics.
  m.def("batch_group_norm_forward(Tensor input, int num_groups, Tensor? weight, Tensor? bias, "
        "Tensor? running_mean, Tensor? running_var, bool use_batch_stats, float eps) "
        "-> (Tensor output, Tensor batch_mean, Tensor batch_var, Tensor center, Tensor invstd)");
  m.def("batch_group_norm_backward(Tensor grad_output, Tensor input, int num_groups, Tensor? weight, "
        "Tensor center, Tensor invstd, bool use_batch_stats) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // CBN: past_mean/past_var (K, C) compensated statistics of stored steps, past_keep (K, C)
  // bool; batch_mean/batch_var are the current step's (what the window stores).
  m.def("cross_iteration_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, Tensor past_mean, Tensor past_var, Tensor past_keep, bool use_batch_stats, "
        "float eps) -> (Tensor output, Tensor batch_mean, Tensor batch_var, Tensor center, Tensor invstd)");
  m.def("cross_iteration_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor center, "
        "Tensor invstd, Tensor past_keep, bool use_batch_stats) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

// The running update is ATen ops on tiny tensors: one implementation for every device.
TORCH_LIBRARY_IMPL(stochnorm_ext, CompositeExplicitAutograd, m) {
  m.impl("update_running_stats", &stochnorm_ext::update_running_stats);
}
