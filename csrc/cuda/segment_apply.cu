// The two elementwise passes of the shared CUDA core: the forward apply
// y = (x - center) * scale + shift and the backward apply dx = k_dy * dy + k_x * (x - center) + k_0,
// with per-segment coefficients each thread reads once from the op's tables (coefficients.h:
// ApplyTables, CenterTable; see segment_kernels.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include "segment_core.h"
#include "segment_kernels.cuh"

namespace stochnorm_ext::cuda {
namespace {

template <typename scalar_t, int V>
void launch_apply(const common::SegmentGeometry& geo, const scalar_t* x,
                  const coefficients::ApplyTables<acc_type<scalar_t>>& tables, scalar_t* y) {
  const WalkGeometry g = walk_geometry(geo);
  const LaunchShape shape = plan(geo, V, kMaxApplySplits);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (geo.interleaved) {
    interleaved_apply_kernel<scalar_t, V><<<grid_of(shape), block_of(shape), 0, stream>>>(g, x, tables, y);
  } else {
    planar_apply_kernel<scalar_t, V><<<grid_of(shape), block_of(shape), 0, stream>>>(g, x, tables, y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int V>
void launch_grad_apply(const common::SegmentGeometry& geo, const scalar_t* dy, const scalar_t* x,
                       coefficients::CenterTable<acc_type<scalar_t>> center, const acc_type<scalar_t>* k_dy,
                       const acc_type<scalar_t>* k_x, const acc_type<scalar_t>* k_0, scalar_t* dx) {
  const WalkGeometry g = walk_geometry(geo);
  const LaunchShape shape = plan(geo, V, kMaxApplySplits);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (geo.interleaved) {
    interleaved_grad_apply_kernel<scalar_t, V>
        <<<grid_of(shape), block_of(shape), 0, stream>>>(g, dy, x, center, k_dy, k_x, k_0, dx);
  } else {
    planar_grad_apply_kernel<scalar_t, V>
        <<<grid_of(shape), block_of(shape), 0, stream>>>(g, dy, x, center, k_dy, k_x, k_0, dx);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor segment_apply(const SegmentInput& in, const common::ApplyArgs& args) {
  at::Tensor y = common::new_output(in.x.sizes(), in.x.options(), in.format);
  if (in.x.numel() == 0) return y;
  check_geometry(in.geometry);
  STOCHNORM_CUDA_DISPATCH(in.x.scalar_type(), "segment_apply_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    const coefficients::ApplyTables<acc_t> tables = args.tables<acc_t>();
    if (use_packs<scalar_t>(in.geometry, {x, out})) {
      launch_apply<scalar_t, kPackWidth<scalar_t>>(in.geometry, x, tables, out);
    } else {
      launch_apply<scalar_t, 1>(in.geometry, x, tables, out);
    }
  });
  return y;
}

at::Tensor segment_grad_apply(const at::Tensor& grad_output, const SegmentInput& in, const at::Tensor& center,
                              int64_t segments_per_stat, const at::Tensor& k_dy, const at::Tensor& k_x,
                              const at::Tensor& k_0) {
  const at::Tensor dy = common::same_layout(grad_output, in);
  at::Tensor dx = common::new_output(in.x.sizes(), in.x.options(), in.format);
  if (in.x.numel() == 0) return dx;
  check_geometry(in.geometry);
  STOCHNORM_CUDA_DISPATCH(in.x.scalar_type(), "segment_grad_apply_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    scalar_t* out = dx.data_ptr<scalar_t>();
    const coefficients::CenterTable<acc_t> c_ptr{center.const_data_ptr<acc_t>(), segments_per_stat};
    const acc_t *a_ptr = k_dy.const_data_ptr<acc_t>(), *b_ptr = k_x.const_data_ptr<acc_t>(),
                *z_ptr = k_0.const_data_ptr<acc_t>();
    if (use_packs<scalar_t>(in.geometry, {dy_ptr, x, out})) {
      launch_grad_apply<scalar_t, kPackWidth<scalar_t>>(in.geometry, dy_ptr, x, c_ptr, a_ptr, b_ptr, z_ptr, out);
    } else {
      launch_grad_apply<scalar_t, 1>(in.geometry, dy_ptr, x, c_ptr, a_ptr, b_ptr, z_ptr, out);
    }
  });
  return dx;
}

}  // namespace stochnorm_ext::cuda
