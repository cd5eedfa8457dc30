// The two steps of CBN's window, after their dot products (stochnorm_ext/cbn_window.py holds
// the window's layout and the same math in plain PyTorch, which the reference and Triton
// backends run):
//  - compensate: every stored entry moved to the current conv weight W by a first-order
//    Taylor step, and whether a channel keeps it (an index step over the K x C entries);
//  - store: this step's entry written into the ring buffer's head slot (an index step per
//    channel; the Jacobian rows by index_copy_), then head and step advance (one index).
// The dot products <dmu_k, W_c> and <dvar_k, W_c> come in as (C, K) tables from two batched
// matrix products in the window's dtype (ops_impl.h, as cbn_window._window_dots takes them),
// the same routine for <., W(t)> and <., W(tau)>: a weight that did not move compensates by
// exactly zero. T is the window's dtype (float or double); the compensated statistics and the
// stored dot products are float64.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace stochnorm_ext::cbn_window {

// ------------------------------------------------------------------ compensate (index step, K*C)
// Entry i = k * C + c. With moved = <dmu_k, W_c> - <dmu_k, W_c(tau)> (the stored dot product):
//     past_mean = mean_k + rho * moved
//     past_var  = var_k + rho * (<dvar_k, W_c> - <dvar_k, W_c(tau)>) - rho^2 moved^2
// kept when the slot is filled, past_var >= 0 (the published rule) and the burn-in is over.
template <typename T>
struct Compensate {
  int64_t channels;       // C
  int64_t slots;          // K
  const T* mean;          // (K, C)
  const T* var;
  const T* mu_dots;       // (C, K) <dmu_k, W_c>
  const T* var_dots;      // (C, K) <dvar_k, W_c>
  const double* dmu_w;    // (K, C) <dmu_k, W_c(tau)>
  const double* dvar_w;
  const bool* valid;      // (K,)
  const int64_t* step;    // CBN's step counter (read on the device: no host sync)
  int64_t burnin;
  double rho;
  double* past_mean;      // (K, C)
  double* past_var;
  bool* keep;
};

struct CompensateStep {
  template <typename T>
  C10_HOST_DEVICE void operator()(int64_t i, const Compensate<T>& a) const {
    const int64_t k = i / a.channels, c = i % a.channels, d = c * a.slots + k;
    const double moved = double(a.mu_dots[d]) - a.dmu_w[i];
    const double var = double(a.var[i]) + a.rho * (double(a.var_dots[d]) - a.dvar_w[i]) - a.rho * a.rho * moved * moved;
    a.past_mean[i] = double(a.mean[i]) + a.rho * moved;
    a.past_var[i] = var;
    a.keep[i] = a.valid[k] && var >= 0 && (a.burnin <= 0 || *a.step >= a.burnin);
  }
};

// ------------------------------------------------------------------ store (index step, C; then one index)
// Once the burn-in is over (every step with burnin 0), slot h = head gets the current batch's
// mean and variance and the Jacobians' dot products with W(tau), and is marked valid (the
// Jacobian rows themselves are copied by ATen's index_copy_ in ops_impl.h, at memory speed).
// Then (a second launch: every index reads head and step) head advances when the entry was
// stored, and the step counts.
template <typename T>
struct Store {
  int64_t channels;          // C
  int64_t slots;             // K
  T* mean;                   // (K, C)
  T* var;
  double* dmu_w;             // (K, C)
  double* dvar_w;
  bool* valid;               // (K,)
  int64_t* head;             // ()
  int64_t* step;             // ()
  int64_t burnin;
  const T* mu_t;             // (C,) this step's statistics
  const T* var_t;
  const T* products_mean;    // (C,) <dmu, W_c(tau)> from the products, or nullptr when given:
  const T* products_var;
  const double* dots_mean;   // (C,) the given ones (float64)
  const double* dots_var;
};

template <typename T>
C10_HOST_DEVICE inline bool stores(const Store<T>& a) {
  return a.burnin <= 0 || *a.step >= a.burnin;
}

struct StoreStep {
  template <typename T>
  C10_HOST_DEVICE void operator()(int64_t c, const Store<T>& a) const {
    const int64_t h = *a.head;
    // (A head outside the ring, from a corrupted state, is refused by the rows' index_copy_
    // before this step; on a GPU that refusal is asynchronous, so the slot is checked here too.)
    if (!stores(a) || h < 0 || h >= a.slots) return;
    const int64_t e = h * a.channels + c;
    a.mean[e] = a.mu_t[c];
    a.var[e] = a.var_t[c];
    a.dmu_w[e] = a.products_mean != nullptr ? double(a.products_mean[c]) : a.dots_mean[c];
    a.dvar_w[e] = a.products_var != nullptr ? double(a.products_var[c]) : a.dots_var[c];
    if (c == 0) a.valid[h] = true;
  }
};

struct AdvanceStep {
  template <typename T>
  C10_HOST_DEVICE void operator()(int64_t, const Store<T>& a) const {
    if (stores(a)) *a.head = (*a.head + 1) % a.slots;
    *a.step += 1;
  }
};

}  // namespace stochnorm_ext::cbn_window
