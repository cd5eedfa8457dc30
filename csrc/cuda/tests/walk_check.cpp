// Host-side check of the CUDA core's work split, indexing and per-thread arithmetic
// (csrc/cuda/segment_walk.h with walk_geometry.h and reduce_states.h), runnable without a GPU:
//
//   c++ -std=c++17 -O1 -Wall -Wextra -Wno-unknown-pragmas -I<torch>/include
//       csrc/cuda/tests/walk_check.cpp -L<torch>/lib -lc10 -Wl,-rpath,<torch>/lib -o walk_check
//   ./walk_check
//
// (tests/test_cuda_backend.py::test_walk_check_on_host does exactly that.) For many geometries,
// both layouts, every dtype, packed and scalar access and several launch shapes, it replays every
// (block, thread) of a launch sequentially with the same loops as the kernels of
// segment_kernels.cuh, merges the per-thread states the way the block reduction and the split
// merge do (columns of equal threadIdx.x; splits in order), and compares with a float64
// reference: every value counted exactly once, statistics and sums accurate, every output
// element written with the right value. What it cannot check: the shuffles and shared memory
// of block_reduce, and anything about the GPU itself.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../segment_walk.h"

using namespace stochnorm_ext::cuda;

namespace {

int failures = 0;
int64_t launches = 0, split_launches = 0, max_splits_seen = 0;  // coverage of the split merge

void expect(bool ok, const std::string& what) {
  if (!ok) {
    if (++failures <= 20) std::printf("FAIL: %s\n", what.c_str());
  }
}

std::string describe(const WalkGeometry& g, bool interleaved, int V, const char* dtype, int64_t target) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s %s V=%d N=%lld C=%lld P=%lld L=%lld target=%lld", dtype,
                interleaved ? "interleaved" : "planar", V, (long long)g.N, (long long)g.C, (long long)g.P,
                (long long)g.L, (long long)target);
  return buf;
}

// Segment of element e of the dense tensor (reference indexing, by division).
int64_t segment_of(const WalkGeometry& g, bool interleaved, int64_t e) {
  if (interleaved) {  // (N, P, L, C)
    const int64_t c = e % g.C;
    const int64_t p = (e / (g.C * g.L)) % g.P;
    return c * g.P + p;
  }
  return (e / g.L) % g.segments();  // (N, R, L)
}

// The thread lattice of one launch: calls visit(segment or channel-pack, piece, first, stride,
// column, block_key) for each thread, looping over clamped grid dimensions like the kernels.
template <typename F>
void for_each_thread(const WalkGeometry& g, bool interleaved, int V, const LaunchShape& s, F&& visit) {
  if (!interleaved) {
    for (int64_t by = 0; by < s.grid_y; ++by)
      for (int64_t bx = 0; bx < s.grid_x; ++bx)
        for (int64_t r = bx; r < g.segments(); r += s.grid_x)
          for (int tx = 0; tx < s.block_x; ++tx) visit(r, int64_t(0), by * s.block_x + tx, s.grid_y * s.block_x, by);
    return;
  }
  const int64_t tiles = ceil_div(g.C / V, s.block_x);
  for (int64_t bz = 0; bz < s.grid_z; ++bz)
    for (int64_t by = 0; by < s.grid_y; ++by)
      for (int64_t bx = 0; bx < s.grid_x; ++bx)
        for (int64_t p = bz; p < g.P; p += s.grid_z)
          for (int64_t tile = bx; tile < tiles; tile += s.grid_x)
            for (int ty = 0; ty < s.block_y; ++ty)
              for (int tx = 0; tx < s.block_x; ++tx)
                visit(tile * s.block_x + tx, p, by * s.block_y + ty, s.grid_y * s.block_y, by);
}

void check_shape(const LaunchShape& s, bool interleaved, const std::string& name) {
  const int threads = s.block_x * s.block_y;
  expect(threads % kWarpSize == 0 && threads <= kMaxBlockThreads, name + ": block is not whole warps <= 256");
  if (interleaved) {  // block_reduce needs columns that divide a warp
    expect((s.block_x & (s.block_x - 1)) == 0 && s.block_x <= kWarpSize,
           name + ": interleaved block_x is not a power of two <= 32");
  } else {
    expect(s.block_y == 1, name + ": planar block_y != 1");
  }
  expect(s.grid_y == s.splits && s.splits >= 1 && s.splits <= kMaxApplySplits, name + ": bad splits");
  expect(s.grid_x >= 1 && s.grid_x <= kMaxGridX && s.grid_z >= 1 && s.grid_z <= kMaxGridYZ, name + ": bad grid");
}

template <typename scalar_t, int V>
void check_case(const WalkGeometry& g, bool interleaved, int64_t target, const char* dtype, std::mt19937& rng,
                double offset) {
  using acc_t = acc_type<scalar_t>;
  const std::string name = describe(g, interleaved, V, dtype, target);
  const int64_t numel = g.N * g.segments() * g.L;
  const int64_t S = g.segments();
  // Data with a common offset; packs need 16-byte alignment, std::vector of 16-byte elements gives it.
  std::vector<Pack<scalar_t, kPackWidth<scalar_t>>> storage_x(ceil_div(numel, kPackWidth<scalar_t>) + 1),
      storage_dy(storage_x.size()), storage_y(storage_x.size());
  scalar_t* x = reinterpret_cast<scalar_t*>(storage_x.data());
  scalar_t* dy = reinterpret_cast<scalar_t*>(storage_dy.data());
  scalar_t* y = reinterpret_cast<scalar_t*>(storage_y.data());
  std::normal_distribution<double> normal;
  for (int64_t e = 0; e < numel; ++e) {
    x[e] = static_cast<scalar_t>(offset + normal(rng) + 0.1 * double(segment_of(g, interleaved, e) % 5));
    dy[e] = static_cast<scalar_t>(normal(rng));
  }
  // float64 reference per segment (from the values as stored in scalar_t).
  std::vector<double> count(S, 0), sum(S, 0), mean(S, 0), m2(S, 0), sdy(S, 0), sdyxc(S, 0);
  std::vector<acc_t> center(S), scale(S), shift(S), kdy(S), kx(S), k0(S);
  for (int64_t e = 0; e < numel; ++e) {
    const int64_t s = segment_of(g, interleaved, e);
    count[s] += 1;
    sum[s] += double(static_cast<acc_t>(x[e]));
  }
  for (int64_t s = 0; s < S; ++s) {
    mean[s] = sum[s] / count[s];
    center[s] = acc_t(mean[s] + 0.01 * double(s % 3));  // a center near, not at, the mean
    scale[s] = acc_t(0.5 + 0.1 * double(s % 7));
    shift[s] = acc_t(-0.25 * double(s % 4));
    kdy[s] = acc_t(1.5 - 0.1 * double(s % 5));
    kx[s] = acc_t(0.2 * double(s % 3) - 0.1);
    k0[s] = acc_t(0.05 * double(s % 2));
  }
  for (int64_t e = 0; e < numel; ++e) {
    const int64_t s = segment_of(g, interleaved, e);
    const double xv = double(static_cast<acc_t>(x[e])), dv = double(static_cast<acc_t>(dy[e]));
    m2[s] += (xv - mean[s]) * (xv - mean[s]);
    sdy[s] += dv;
    sdyxc[s] += dv * (xv - double(center[s]));
  }
  const double rel = sizeof(acc_t) == 8 ? 1e-11 : 5e-6;  // float32: shifted Welford, even at 1e4 offsets
  // The tables as the kernels read them, one entry per segment (spg = P = 1 in their indexing;
  // the per-statistic indexing is coefficients.h's, which the CPU backend runs too).
  const stochnorm_ext::coefficients::CenterTable<acc_t> centers{center.data(), 1};
  const stochnorm_ext::coefficients::ApplyTables<acc_t> tables{1, 1, center.data(), nullptr, scale.data(),
                                                               shift.data(), acc_t(0)};

  // ---- statistics: per-thread states -> merged per (split, segment) column -> splits in order.
  for (int64_t max_splits : {kMaxReduceSplits, int64_t(3)}) {
    const LaunchShape shape =
        interleaved ? plan_interleaved(g, V, target, max_splits) : plan_planar(g, V, target, max_splits);
    check_shape(shape, interleaved, name);
    ++launches;
    split_launches += shape.splits > 1;
    max_splits_seen = std::max(max_splits_seen, shape.splits);
    std::vector<Moments<acc_t, 1>> part(shape.splits * S);
    for (auto& m : part) m.reset();
    std::vector<Sums<acc_t, 1>> part_sums(shape.splits * S);
    for (auto& m : part_sums) m.reset();
    for_each_thread(g, interleaved, V, shape, [&](int64_t a, int64_t p, int64_t first, int64_t stride, int64_t split) {
      if (!interleaved) {
        const int64_t r = a;
        part[split * S + r].merge(planar_thread_stats<scalar_t, V>(g, x, r, first, stride));
        part_sums[split * S + r].merge(planar_thread_grad_sums<scalar_t, V>(g, dy, x, center[r], r, first, stride));
        return;
      }
      const int64_t cv = a;
      const auto m = interleaved_thread_stats<scalar_t, V>(g, x, cv, p, first, stride);
      const auto t = interleaved_thread_grad_sums<scalar_t, V>(g, dy, x, centers, cv, p, first, stride);
      if (cv * V >= g.C) {
        expect(m.count == 0, name + ": a thread past the channels counted values");
        return;
      }
      for (int k = 0; k < V; ++k) {
        const int64_t s = interleaved_segment(g, cv, p, k, V);
        Moments<acc_t, 1> lane;
        lane.count = m.count;
        lane.mean[0] = m.mean[k];
        lane.m2[0] = m.m2[k];
        part[split * S + s].merge(lane);
        Sums<acc_t, 1> lane_sums;
        lane_sums.dy[0] = t.dy[k];
        lane_sums.dy_xc[0] = t.dy_xc[k];
        part_sums[split * S + s].merge(lane_sums);
      }
    });
    for (int64_t s = 0; s < S; ++s) {
      // The thread states hold moments of values shifted by the segment's first value.
      const acc_t shift = interleaved ? interleaved_shift(g, x, (s / g.P) / V, s % g.P, int((s / g.P) % V), V)
                                      : planar_shift(g, x, s);
      Moments<acc_t, 1> total;
      total.reset();
      Sums<acc_t, 1> total_sums;
      total_sums.reset();
      for (int64_t k = 0; k < shape.splits; ++k) {
        total.merge(part[k * S + s]);
        total_sums.merge(part_sums[k * S + s]);
      }
      const std::string at = name + " segment " + std::to_string(s);
      expect(double(total.count) == count[s], at + ": count " + std::to_string(double(total.count)) + " != " +
                                                  std::to_string(count[s]));
      const double got_mean = double(shift + total.mean[0]);
      expect(std::abs(got_mean - mean[s]) <= rel * (std::abs(mean[s]) + 1), at + ": mean");
      expect(std::abs(double(total.m2[0]) - m2[s]) <= 10 * rel * m2[s] + 1e-12, at + ": m2 " +
                                                           std::to_string(double(total.m2[0])) + " vs " +
                                                           std::to_string(m2[s]));
      const double scale_dy = std::sqrt(count[s]) + 1;
      expect(std::abs(double(total_sums.dy[0]) - sdy[s]) <= rel * 10 * scale_dy, at + ": sum dy");
      expect(std::abs(double(total_sums.dy_xc[0]) - sdyxc[s]) <= rel * 10 * scale_dy * 4, at + ": sum dy*xc");
    }
  }

  // ---- elementwise passes: every element written, with the formula's value.
  const LaunchShape shape =
      interleaved ? plan_interleaved(g, V, target, kMaxApplySplits) : plan_planar(g, V, target, kMaxApplySplits);
  check_shape(shape, interleaved, name);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t e = 0; e < numel; ++e) y[e] = static_cast<scalar_t>(NAN);
    for_each_thread(g, interleaved, V, shape, [&](int64_t a, int64_t p, int64_t first, int64_t stride, int64_t) {
      if (!interleaved) {
        const int64_t r = a;
        if (pass == 0) {
          planar_thread_apply<scalar_t, V>(g, x, y, center[r], scale[r], shift[r], r, first, stride);
        } else {
          planar_thread_grad_apply<scalar_t, V>(g, dy, x, y, center[r], kdy[r], kx[r], k0[r], r, first, stride);
        }
      } else if (pass == 0) {
        interleaved_thread_apply<scalar_t, V>(g, x, y, tables, a, p, first, stride);
      } else {
        interleaved_thread_grad_apply<scalar_t, V>(g, dy, x, y, centers, kdy.data(), kx.data(), k0.data(), a, p, first,
                                                   stride);
      }
    });
    int bad = 0;
    for (int64_t e = 0; e < numel && bad < 3; ++e) {
      const int64_t s = segment_of(g, interleaved, e);
      const acc_t xv = static_cast<acc_t>(x[e]), dv = static_cast<acc_t>(dy[e]);
      const scalar_t want = pass == 0 ? static_cast<scalar_t>((xv - center[s]) * scale[s] + shift[s])
                                      : static_cast<scalar_t>(kdy[s] * dv + kx[s] * (xv - center[s]) + k0[s]);
      const double got = double(static_cast<acc_t>(y[e])), expected = double(static_cast<acc_t>(want));
      // Same formula in the same precision: equal up to the last bit of scalar_t (fma contraction).
      const double tol = (sizeof(scalar_t) == 2 ? 1e-2 : 1e-6) * (std::abs(expected) + 1);
      if (!(std::abs(got - expected) <= tol)) {
        ++bad;
        expect(false, name + (pass == 0 ? ": apply" : ": grad_apply") + " element " + std::to_string(e) + " = " +
                          std::to_string(got) + ", expected " + std::to_string(expected));
      }
    }
  }
}

template <typename scalar_t>
void check_dtype(const char* dtype, std::mt19937& rng) {
  // (N, C, P, L): small channel counts, odd sizes, pieces, single samples, long rows.
  const std::vector<WalkGeometry> geometries = {
      {2, 3, 1, 16},  {1, 7, 1, 24},  {3, 17, 1, 8},  {4, 8, 1, 1},   {5, 16, 2, 8},  {2, 4, 4, 16},
      {1, 2, 1, 1000}, {9, 64, 1, 8}, {2, 24, 3, 32}, {64, 8, 1, 16}, {1, 1, 1, 4096}, {3, 40, 1, 5},
      {4, 3, 1, 8192}, {512, 3, 1, 36}, {2, 2, 8, 2048}};  // the last three get many splits
  const int64_t targets[] = {1, 8, 1056};
  for (const WalkGeometry& g : geometries) {
    for (bool interleaved : {false, true}) {
      for (int64_t target : targets) {
        const double offset = target == 8 ? 1e4 : 0.0;  // large common offset on one launch shape
        const int64_t along = interleaved ? g.C : g.L;
        if (along % kPackWidth<scalar_t> == 0) {
          check_case<scalar_t, kPackWidth<scalar_t>>(g, interleaved, target, dtype, rng, offset);
        }
        check_case<scalar_t, 1>(g, interleaved, target, dtype, rng, offset);
      }
    }
  }
}

void check_cursor() {
  // Every (outer, inner) of first + k * stride, against division.
  for (int64_t inner_size : {1, 2, 3, 7, 64, 1000}) {
    for (int64_t stride : {1, 2, 5, 64, 999, 1000, 1001, 4096}) {
      for (int64_t first : {0, 1, 6, 1000}) {
        LatticeCursor cur(first, stride, inner_size);
        for (int64_t k = 0; k < 50; ++k) {
          const int64_t i = first + k * stride;
          expect(cur.outer == i / inner_size && cur.inner == i % inner_size, "LatticeCursor");
          cur.advance();
        }
      }
    }
  }
}

void check_large_plans() {
  // Launch shapes for tensors past 2^31 elements stay within the hardware limits.
  const WalkGeometry big_planar{1 << 16, 3, 1, 1 << 15};  // 6.4e9 values
  const WalkGeometry big_interleaved{1 << 14, 3, 1, 1 << 17};
  const WalkGeometry many_segments{2, 1 << 20, 70000, 1};
  for (int64_t splits : {kMaxReduceSplits, kMaxApplySplits}) {
    check_shape(plan_planar(big_planar, 4, 1056, splits), false, "big planar");
    check_shape(plan_interleaved(big_interleaved, 1, 1056, splits), true, "big interleaved");
    check_shape(plan_interleaved(many_segments, 1, 1056, splits), true, "many pieces");
    check_shape(plan_planar(many_segments, 1, 1056, splits), false, "many segments");
  }
  // The offset of the last element of a > 2^31-element planar walk is computed in 64 bits.
  const int64_t last = planar_offset(big_planar, 2, big_planar.N - 1, big_planar.L / 4 - 1, 4);
  expect(last == big_planar.N * 3 * big_planar.L - 4, "64-bit planar offset");
  const int64_t last_i = interleaved_offset(big_interleaved, 2, 0, big_interleaved.N - 1, big_interleaved.L - 1, 1);
  expect(last_i == big_interleaved.N * big_interleaved.L * 3 - 1, "64-bit interleaved offset");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_cursor();
  check_large_plans();
  check_dtype<float>("float32", rng);
  check_dtype<double>("float64", rng);
  check_dtype<c10::Half>("float16", rng);
  check_dtype<c10::BFloat16>("bfloat16", rng);
  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("walk_check: all checks passed (%lld reductions, %lld of them split, up to %lld splits)\n",
              (long long)launches, (long long)split_launches, (long long)max_splits_seen);
  return 0;
}
