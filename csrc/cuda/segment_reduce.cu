// The two reductions of the shared CUDA core: per-segment statistics (mean, m2) and the
// backward sums (sum dy, sum dy * (x - center)). See segment_kernels.cuh for the kernels and
// the split scheme, segment_walk.h for the layouts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include "segment_core.h"
#include "segment_kernels.cuh"

namespace stochnorm_ext::cuda {
namespace {

// Threads of the block that merges one segment's partials: whole warps, at most 256.
int merge_threads(int64_t splits) {
  return int(std::min<int64_t>(kMaxBlockThreads, ceil_div(splits, kWarpSize) * kWarpSize));
}

unsigned merge_blocks(int64_t segments) { return static_cast<unsigned>(std::min(segments, kMaxGridX)); }

template <typename scalar_t, int V>
void launch_stats(const common::SegmentGeometry& geo, const scalar_t* x, int64_t* step_count, at::Tensor& mean,
                  at::Tensor& m2) {
  using acc_t = acc_type<scalar_t>;
  const WalkGeometry g = walk_geometry(geo);
  const LaunchShape shape = plan(geo, V, kMaxReduceSplits);
  const int64_t segments = g.segments();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // One split: the blocks write the final (double) tables. Several: partials [split][segment]
  // in the accumulation type, merged after.
  at::Tensor part_count, part_mean, part_m2, part_shift;
  StatsOut<acc_t> out{step_count, nullptr, nullptr, nullptr, nullptr, mean.data_ptr<double>(), m2.data_ptr<double>()};
  if (shape.splits > 1) {
    const at::TensorOptions acc = mean.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    part_count = at::empty({shape.splits, segments}, acc);
    part_mean = at::empty({shape.splits, segments}, acc);
    part_m2 = at::empty({shape.splits, segments}, acc);
    part_shift = at::empty({segments}, acc);
    out.part_count = part_count.data_ptr<acc_t>();
    out.part_mean = part_mean.data_ptr<acc_t>();
    out.part_m2 = part_m2.data_ptr<acc_t>();
    out.part_shift = part_shift.data_ptr<acc_t>();
  }
  if (geo.interleaved) {
    interleaved_stats_kernel<scalar_t, V><<<grid_of(shape), block_of(shape), 0, stream>>>(g, x, out);
  } else {
    planar_stats_kernel<scalar_t, V><<<grid_of(shape), block_of(shape), 0, stream>>>(g, x, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (shape.splits > 1) {
    common::count_launch();  // the merge: a second kernel of this pass (tests count launches)
    merge_stats_kernel<acc_t><<<merge_blocks(segments), merge_threads(shape.splits), 0, stream>>>(
        segments, shape.splits, part_count.const_data_ptr<acc_t>(), part_mean.const_data_ptr<acc_t>(),
        part_m2.const_data_ptr<acc_t>(), part_shift.const_data_ptr<acc_t>(), mean.data_ptr<double>(),
        m2.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int V>
void launch_grad_sums(const common::SegmentGeometry& geo, const scalar_t* dy, const scalar_t* x,
                      coefficients::CenterTable<acc_type<scalar_t>> center, at::Tensor& sum_dy,
                      at::Tensor& sum_dy_xc) {
  using acc_t = acc_type<scalar_t>;
  const WalkGeometry g = walk_geometry(geo);
  const LaunchShape shape = plan(geo, V, kMaxReduceSplits);
  const int64_t segments = g.segments();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor part_dy, part_dy_xc;
  acc_t *out_dy = sum_dy.data_ptr<acc_t>(), *out_dy_xc = sum_dy_xc.data_ptr<acc_t>();
  if (shape.splits > 1) {
    part_dy = at::empty({shape.splits, segments}, sum_dy.options());
    part_dy_xc = at::empty({shape.splits, segments}, sum_dy.options());
    out_dy = part_dy.data_ptr<acc_t>();
    out_dy_xc = part_dy_xc.data_ptr<acc_t>();
  }
  if (geo.interleaved) {
    interleaved_grad_sums_kernel<scalar_t, V>
        <<<grid_of(shape), block_of(shape), 0, stream>>>(g, dy, x, center, out_dy, out_dy_xc);
  } else {
    planar_grad_sums_kernel<scalar_t, V>
        <<<grid_of(shape), block_of(shape), 0, stream>>>(g, dy, x, center, out_dy, out_dy_xc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (shape.splits > 1) {
    common::count_launch();  // the merge: a second kernel of this pass
    merge_sums_kernel<acc_t><<<merge_blocks(segments), merge_threads(shape.splits), 0, stream>>>(
        segments, shape.splits, part_dy.const_data_ptr<acc_t>(), part_dy_xc.const_data_ptr<acc_t>(),
        sum_dy.data_ptr<acc_t>(), sum_dy_xc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_stats(const SegmentInput& in, const at::Tensor& step_count) {
  at::Tensor mean = common::new_output({in.channels, in.pieces}, common::stats_table_options(in));
  at::Tensor m2 = common::new_output({in.channels, in.pieces}, common::stats_table_options(in));
  if (mean.numel() == 0 || in.x.numel() == 0) {  // no values: empty moments, as the CPU core gives
    mean.zero_();
    m2.zero_();
    if (step_count.defined()) step_count.add_(1);
    return {mean, m2};
  }
  check_geometry(in.geometry);
  int64_t* count = step_count.defined() ? step_count.data_ptr<int64_t>() : nullptr;
  STOCHNORM_CUDA_DISPATCH(in.x.scalar_type(), "segment_stats_cuda", [&] {
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    if (use_packs<scalar_t>(in.geometry, {x})) {
      launch_stats<scalar_t, kPackWidth<scalar_t>>(in.geometry, x, count, mean, m2);
    } else {
      launch_stats<scalar_t, 1>(in.geometry, x, count, mean, m2);
    }
  });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> segment_grad_sums(const at::Tensor& grad_output, const SegmentInput& in,
                                                     const at::Tensor& center, int64_t segments_per_stat) {
  const at::Tensor dy = common::same_layout(grad_output, in);
  at::Tensor sum_dy = common::new_output({in.channels, in.pieces}, common::table_options(in));
  at::Tensor sum_dy_xc = common::new_output({in.channels, in.pieces}, common::table_options(in));
  if (sum_dy.numel() == 0) return {sum_dy, sum_dy_xc};
  if (in.x.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xc.zero_();
    return {sum_dy, sum_dy_xc};
  }
  check_geometry(in.geometry);
  STOCHNORM_CUDA_DISPATCH(in.x.scalar_type(), "segment_grad_sums_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const coefficients::CenterTable<acc_t> center_ptr{center.const_data_ptr<acc_t>(), segments_per_stat};
    if (use_packs<scalar_t>(in.geometry, {dy_ptr, x})) {
      launch_grad_sums<scalar_t, kPackWidth<scalar_t>>(in.geometry, dy_ptr, x, center_ptr, sum_dy, sum_dy_xc);
    } else {
      launch_grad_sums<scalar_t, 1>(in.geometry, dy_ptr, x, center_ptr, sum_dy, sum_dy_xc);
    }
  });
  return {sum_dy, sum_dy_xc};
}

}  // namespace stochnorm_ext::cuda
