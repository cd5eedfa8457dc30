// The running-statistics arguments of the three statistics ops (csrc/ops_impl.h): their checks,
// the step count (which the stats pass increments), and what the coefficient step needs to do
// the EMA in place.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "coefficients.h"
#include "common.h"

namespace stochnorm_ext::ops_impl {

// Checked in the constructor, before anything is mutated. The step writes the running
// statistics through raw pointers: when a buffer is not dense in the accumulation dtype (e.g.
// float64 running statistics with float32 input) the step works on a converted copy, copied
// back after it (two more launches; float32 running statistics with half input need none).
struct StatsArgs {
  at::Tensor rm, rv;          // what the step reads and writes (the buffers, or working copies)
  at::Tensor rm_buf, rv_buf;  // the buffers, when rm / rv are working copies to copy back
  at::Tensor step_count;      // num_batches_tracked, incremented by the stats pass (when counted)
  bool update = false;        // the EMA runs
  std::optional<double> momentum;

  StatsArgs(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
            int64_t num_stats, std::optional<double> momentum_, const std::optional<at::Tensor>& num_batches_tracked,
            bool update_stats, bool required, const char* op)
      : momentum(momentum_) {
    const bool given = running_mean.defined() || running_var.defined();
    TORCH_CHECK(!required || (running_mean.defined() && running_var.defined()), op,
                ": running_mean and running_var are required");
    TORCH_CHECK(!given || (running_mean.defined() && running_var.defined()), op,
                ": running_mean and running_var must be given together");
    const at::ScalarType acc = common::accumulate_type(input.scalar_type());
    if (given) {
      for (const auto& [t, name] : {std::pair{running_mean, "running_mean"}, std::pair{running_var, "running_var"}}) {
        TORCH_CHECK(t.dim() == 1 && t.numel() == num_stats, op, ": ", name, " must have shape (", num_stats,
                    "), got ", t.sizes());
        TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
                    input.device());
        TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating point tensor, got ",
                    t.scalar_type());
      }
    }
    update = update_stats && given;
    const int64_t M = input.numel() / num_stats;
    TORCH_CHECK(!update || M > 1, op, ": the running variance takes the unbiased batch variance, which needs more ",
                "than 1 value per statistic, got ", M);
    const bool counted = update_stats && num_batches_tracked.has_value() && num_batches_tracked->defined();
    if (counted) {
      const at::Tensor& n = *num_batches_tracked;
      TORCH_CHECK(n.scalar_type() == at::kLong && n.numel() == 1, op,
                  ": num_batches_tracked must be a one-element int64 tensor, got ", n.scalar_type(), " of shape ",
                  n.sizes());
      TORCH_CHECK(n.device() == input.device(), op, ": num_batches_tracked is on ", n.device(),
                  " but the input is on ", input.device());
      step_count = n;
    }
    TORCH_CHECK(!update || momentum.has_value() || counted, op,
                ": momentum=None (cumulative average) needs num_batches_tracked");
    if (given) {
      rm = common::dense_as(running_mean, acc);
      rv = common::dense_as(running_var, acc);
      if (update && !rm.is_same(running_mean)) rm_buf = running_mean;
      if (update && !rv.is_same(running_var)) rv_buf = running_var;
    }
  }

  template <typename T>
  coefficients::RunningUpdate<T> update_args(int64_t M) const {
    if (!update) return {nullptr, nullptr, T(0), nullptr, T(1)};
    const int64_t* count = momentum.has_value() ? nullptr : step_count.const_data_ptr<int64_t>();
    return {rm.data_ptr<T>(), rv.data_ptr<T>(), T(momentum.value_or(0.0)), count, T(double(M) / double(M - 1))};
  }

  template <typename Launch>
  void after_step() const {
    if (rm_buf.defined()) Launch::copy_back(rm_buf, rm);
    if (rv_buf.defined()) Launch::copy_back(rv_buf, rv);
  }
};

}  // namespace stochnorm_ext::ops_impl
