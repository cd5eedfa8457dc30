// The two steps of CBN's window (stochnorm_ext/cbn_window.py holds the window's layout and the
// same math in plain PyTorch, which the reference and Triton backends run):
//  - compensate: every stored entry moved to the current conv weight W by a first-order
//    Taylor step, and whether a channel keeps it;
//  - store: this step's entry written into the ring buffer's head slot.
// Both take the dot products <dmu_k, W_c> and <dvar_k, W_c> over the I = Cin/Gc * kh * kw
// weights of channel c themselves (a unit step of coefficients.h: one unit per (entry,
// channel), members = the I weights), accumulated in float64 from the window's own dtype: no
// weight-sized copy or conversion. The store computes <., W(tau)> with the same routine as the
// compensation computes <., W(t)>, so a weight that did not move compensates by exactly zero.
// T is the window's dtype (float or double); the dot products and the compensated statistics
// are float64.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "coefficients.h"

namespace stochnorm_ext::cbn_window {

using coefficients::SumPair;

// Where channel c's weights and Jacobians are: row c of W (C, I) and of dvar (K, C, I); row
// g(c) = c / (C / Gc) of dmu (K, Gc, I).
struct WindowShape {
  int64_t channels;      // C
  int64_t groups;        // Gc, the conv's groups
  int64_t weights;       // I
  C10_HOST_DEVICE int64_t group_of(int64_t c) const { return c / (channels / groups); }
};

// ------------------------------------------------------------------ compensate (unit step)
// Unit u = k * C + c. With moved = <dmu_k, W_c> - <dmu_k, W_c(tau)> (the stored dot product):
//     past_mean = mean_k + rho * moved
//     past_var  = var_k + rho * (<dvar_k, W_c> - <dvar_k, W_c(tau)>) - (rho * moved)^2
// kept when the slot is filled, past_var >= 0 (the published rule) and the burn-in is over.
template <typename T>
struct Compensate {
  WindowShape shape;
  const T* mean;          // (K, C)
  const T* var;
  const T* dmu;           // (K, Gc, I)
  const T* dvar;          // (K, C, I)
  const double* dmu_w;    // (K, C) <dmu_k, W_c(tau)>
  const double* dvar_w;
  const bool* valid;      // (K,)
  const int64_t* step;    // CBN's step counter (read on the device: no host sync)
  int64_t burnin;
  const T* weight;        // (C, I) W(t)
  double rho;
  double* past_mean;      // (K, C)
  double* past_var;
  bool* keep;
};

struct CompensateStep {
  using Partial = SumPair<double>;

  template <typename T>
  C10_HOST_DEVICE Partial partial(int64_t u, int64_t m, const Compensate<T>& a) const {
    const WindowShape& s = a.shape;
    const int64_t k = u / s.channels, c = u % s.channels;
    const double w = double(a.weight[c * s.weights + m]);
    return Partial{w * double(a.dmu[(k * s.groups + s.group_of(c)) * s.weights + m]),
                   w * double(a.dvar[u * s.weights + m])};
  }

  template <typename T>
  C10_HOST_DEVICE void finish(int64_t u, int64_t m, const Partial& dots, const Compensate<T>& a) const {
    if (m != 0) return;
    const double moved = dots.a - a.dmu_w[u], delta = a.rho * moved;
    const double var = double(a.var[u]) + a.rho * (dots.b - a.dvar_w[u]) - delta * delta;
    a.past_mean[u] = double(a.mean[u]) + delta;
    a.past_var[u] = var;
    a.keep[u] = a.valid[u / a.shape.channels] && var >= 0 && (a.burnin <= 0 || *a.step >= a.burnin);
  }
};

// ------------------------------------------------------------------ store (unit step, then one index)
// Unit c = channel, members = its I weights: once the burn-in is over (every step with burnin
// 0), slot h = head gets the current batch's mean and variance, the Jacobians and their dot
// products with W(tau) (given ones, else computed here), and is marked valid. Then (a second
// launch: every unit reads head and step) head advances when the entry was stored, and the step
// counts.
template <typename T>
struct Store {
  WindowShape shape;
  T* mean;                   // (K, C)
  T* var;
  T* dmu;                    // (K, Gc, I)
  T* dvar;                   // (K, C, I)
  double* dmu_w;             // (K, C)
  double* dvar_w;
  bool* valid;               // (K,)
  int64_t* head;             // ()
  int64_t* step;             // ()
  int64_t slots;             // K
  int64_t burnin;
  const T* mu_t;             // (C,) this step's statistics
  const T* var_t;
  const T* new_dmu;          // (Gc, I) this step's Jacobians
  const T* new_dvar;         // (C, I)
  const T* weight;           // (C, I) W(tau)
  const double* dots_mean;   // (C,) given <dmu, W(tau)>, or nullptr: computed
  const double* dots_var;
};

template <typename T>
C10_HOST_DEVICE inline bool stores(const Store<T>& a) {
  return a.burnin <= 0 || *a.step >= a.burnin;
}

struct StoreStep {
  using Partial = SumPair<double>;

  template <typename T>
  C10_HOST_DEVICE Partial partial(int64_t c, int64_t m, const Store<T>& a) const {
    const WindowShape& s = a.shape;
    const double w = double(a.weight[c * s.weights + m]);
    return Partial{w * double(a.new_dmu[s.group_of(c) * s.weights + m]), w * double(a.new_dvar[c * s.weights + m])};
  }

  template <typename T>
  C10_HOST_DEVICE void finish(int64_t c, int64_t m, const Partial& dots, const Store<T>& a) const {
    if (!stores(a)) return;
    const WindowShape& s = a.shape;
    const int64_t h = *a.head, i = c * s.weights + m;
    a.dvar[h * s.channels * s.weights + i] = a.new_dvar[i];
    if (c < s.groups) a.dmu[h * s.groups * s.weights + i] = a.new_dmu[i];  // unit g copies dmu's row g
    if (m != 0) return;
    a.mean[h * s.channels + c] = a.mu_t[c];
    a.var[h * s.channels + c] = a.var_t[c];
    a.dmu_w[h * s.channels + c] = a.dots_mean != nullptr ? a.dots_mean[c] : dots.a;
    a.dvar_w[h * s.channels + c] = a.dots_var != nullptr ? a.dots_var[c] : dots.b;
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
