// The stochnorm_ext operator library: op schemas live here (TORCH_LIBRARY), kernels register
// per dispatch key from csrc/cpu/ (and csrc/cuda/) with TORCH_LIBRARY_IMPL, autograd from
// csrc/autograd.cpp; fake (meta) implementations from Python: stochnorm_ext/backend/compiled/ops.py.
//
// Tables ("(C, P)") are in the accumulation type: float32, or float64 for float64 input.
// A segment is the set of values one statistic covers inside one channel: the whole channel,
// or for BGN with G = P * C one of the P pieces of its flattened positions (see
// csrc/coefficients.h). The passes' centred forms: y = (x - center) * scale + shift, and
// dx = k_dy * dy + k_x * (x - center) + k_0.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

// Importing stochnorm_ext._C loads this shared library, which runs the registrations
// below; no Python functions are exported, so no pybind11 is needed. PyMODINIT_FUNC makes
// the entry point extern "C" and visible despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(stochnorm_ext, m) {
  // ---- The four passes (per segment), composed with collectives by the distributed sync path.
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

  // ---- The statistics ops (one per layer): batch statistics (the pass also counts the step,
  // num_batches_tracked += 1), then ONE coefficient step per statistic that also updates the
  // running statistics in place (EMA; momentum None: 1/num_batches_tracked after this call's
  // increment). Outputs per statistic: the centre and
  // variance norm_apply normalises with and the reduction weight `red` its backward takes.
  // Not differentiable (csrc/autograd.cpp runs them below autograd).
  m.def("stoch_norm_stats(Tensor input, Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mask, "
        "float? momentum, Tensor(c!)? num_batches_tracked, bool update_stats) "
        "-> (Tensor center, Tensor var, Tensor red)");
  m.def("batch_group_norm_stats(Tensor input, int num_groups, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float? momentum, Tensor(c!)? num_batches_tracked, bool update_stats) "
        "-> (Tensor center, Tensor var, Tensor red)");
  // CBN: past_mean/past_var (K, C) compensated statistics of stored steps, past_keep (K, C) bool;
  // mu_t/var_t are the current step's (what the window stores).
  m.def("cross_iteration_norm_stats(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor past_mean, Tensor past_var, Tensor past_keep, float? momentum, "
        "Tensor(c!)? num_batches_tracked, bool update_stats) "
        "-> (Tensor mu_t, Tensor var_t, Tensor center, Tensor var, Tensor red)");

  // ---- One apply and one layer-agnostic backward for the three layers (num_groups statistics:
  // C for StochNorm and CBN). y = (x - center_s) * weight_c * rsqrt(var_s + eps) + bias_c; red
  // (None: constant statistics) only matters to the backward. Autograd: csrc/autograd.cpp.
  m.def("norm_apply(Tensor input, Tensor? weight, Tensor? bias, Tensor center, Tensor var, Tensor? red, "
        "int num_groups, float eps) -> Tensor");
  m.def("norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor center, Tensor var, "
        "Tensor? red, int num_groups, float eps, bool[3] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- CBN's window (csrc/cbn_window.h; the fields of stochnorm_ext.cbn_window.CBNWindow, K
  // stored steps of C channels and I weights per channel, Gc conv groups). compensate: the
  // stored statistics moved to the current conv weight, (K, C) float64, and which entries each
  // channel keeps. store: this step's entry into the head slot once the burn-in is over (dots:
  // its given <dmu, W>, <dvar, W>, else computed), then head and step advance.
  m.def("cbn_window_compensate(Tensor mean, Tensor var, Tensor dmu, Tensor dvar, Tensor dmu_w, "
        "Tensor dvar_w, Tensor valid, Tensor step, Tensor conv_weight, float rho, int burnin) "
        "-> (Tensor past_mean, Tensor past_var, Tensor keep)");
  m.def("cbn_window_store(Tensor(a!) mean, Tensor(b!) var, Tensor(c!) dmu, Tensor(d!) dvar, Tensor(e!) dmu_w, "
        "Tensor(f!) dvar_w, Tensor(g!) valid, Tensor(h!) head, Tensor(i!) step, Tensor mu_t, Tensor var_t, "
        "Tensor new_dmu, Tensor new_dvar, Tensor conv_weight, Tensor? dots_mean, Tensor? dots_var, "
        "int burnin) -> ()");

  // ---- Private: device launches since the library was loaded (csrc/common.h), for the tests.
  m.def("_device_launches() -> int", [] { return stochnorm_ext::common::launch_counter().load(); });
}
