// Vector building blocks of the CPU kernels: loads and stores of scalar_t values as vectors
// of the accumulation type (VecIO), the unrolled steps of a reduction (Wide, Step,
// vector_steps) and horizontal_sum. Kept apart from the kernels so that the contiguous-span
// (span_kernels.h) and channel-row (row_kernels.h) building blocks share one vector idiom.
//
// Compiled once per CPU capability: part of segment_kernels.h, whose includer sets
// CPU_CAPABILITY (the inline namespace keeps the builds apart).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including vec_steps.h (see segment_kernels.h)"
#endif

namespace stochnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads kStep values of scalar_t as kVecs vectors of the accumulation type, and back.
// bfloat16/half: one Vectorized<scalar_t> is two float vectors.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kStep = Vec::size() * kVecs;

  static inline void load(const scalar_t* p, Vec* v) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, v[0], v[1]);
    } else {
      v[0] = Vec::loadu(p);
    }
  }
  static inline void store(scalar_t* p, const Vec* v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
  // kVecs consecutive vectors of a table in the accumulation type.
  static inline void load_table(const acc_t* p, Vec* v) {
    for (int k = 0; k < kVecs; ++k) v[k] = Vec::loadu(p + k * Vec::size());
  }
};

template <typename acc_t>
inline acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// Reductions keep kWide = 4 independent vector accumulators so that the adds are not one
// latency-bound chain; Wide loads 4 vectors of consecutive values (1, 2 or 4 IO steps).
template <typename scalar_t>
struct Wide {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int kVecs = 4;
  static constexpr int64_t kWidth = kVecs * Vec::size();  // values per load
  static_assert(kVecs % IO::kVecs == 0, "a wide load is whole IO steps");

  static inline Vec total(const Vec* acc) { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }
  static inline void zero(Vec* acc) {
    for (int j = 0; j < kVecs; ++j) acc[j] = Vec(typename IO::acc_t(0));
  }
};

// One vector step of a reduction: K vectors (Wide::kVecs, or IO::kVecs for the last whole IO
// steps) of consecutive values or table entries. K is a compile-time constant, so each step
// is its own fully unrolled loop.
template <typename scalar_t, int K>
struct Step {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int kVecs = K;
  static constexpr int64_t kWidth = K * Vec::size();  // values per step
  static_assert(K % IO::kVecs == 0, "a step is whole IO steps");

  static inline void load(const scalar_t* p, Vec* v) {
    for (int u = 0; u < K / IO::kVecs; ++u) IO::load(p + u * IO::kStep, v + u * IO::kVecs);
  }
  static inline void load_table(const typename IO::acc_t* p, Vec* v) {
    for (int j = 0; j < K; ++j) v[j] = Vec::loadu(p + j * Vec::size());
  }
};

// Walks [0, n) as a reduction does: body(i, Step<scalar_t, K>()) for wide steps (K = 4
// vectors) while they fit, then for IO steps (K = IO::kVecs); returns where the values left
// for the scalar tail begin.
template <typename scalar_t, typename Body>
inline int64_t vector_steps(int64_t n, const Body& body) {
  using WideStep = Step<scalar_t, Wide<scalar_t>::kVecs>;
  using IOStep = Step<scalar_t, VecIO<scalar_t>::kVecs>;
  int64_t i = 0;
  for (; i + WideStep::kWidth <= n; i += WideStep::kWidth) body(i, WideStep());
  for (; i + IOStep::kWidth <= n; i += IOStep::kWidth) body(i, IOStep());
  return i;
}

}  // namespace CPU_CAPABILITY
}  // namespace stochnorm_ext::cpu
