// The CUDA kernels of every stochnorm_ext device op: the layers and core ops of csrc/layers.h
// (schemas: csrc/ops.cpp; fake tensors and autograd: stochnorm_ext/_ops.py, shared by all
// devices) over the CUDA core (segment_core.h), with the small per-layer math of
// csrc/coefficients.h run one thread per channel / group / segment by per_index_kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../layers.h"
#include "segment_core.h"

namespace stochnorm_ext::cuda {
namespace {

// One thread per index i < n calls Step()(i, args): Step wraps one function of coefficients.h,
// args is its argument struct (raw device pointers and scalars), passed by value.
template <typename Step, typename Args>
__global__ void per_index_kernel(int64_t n, Args args) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    Step()(i, args);
  }
}

struct CudaDevice {
  // Every op runs on its input's CUDA device. The dispatcher picks these kernels when any
  // tensor argument is a CUDA tensor, so the input itself is checked here; the other arguments
  // are checked against the input's device where they are read.
  static c10::cuda::CUDAGuard enter(const at::Tensor& input, const char* op) {
    TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA input for the CUDA kernels, got a tensor on ", input.device());
    return c10::cuda::CUDAGuard(input.device());
  }

  static constexpr auto segment_stats = &cuda::segment_stats;
  static constexpr auto segment_apply = &cuda::segment_apply;
  static constexpr auto segment_grad_sums = &cuda::segment_grad_sums;
  static constexpr auto segment_grad_apply = &cuda::segment_grad_apply;

  template <typename Step, typename Args>
  static void for_each_index(int64_t n, const Args& args) {
    if (n <= 0) return;
    constexpr int kThreads = 128;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 65535));
    per_index_kernel<Step, Args><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, CUDA, m) {
  layers::register_kernels<CudaDevice>(m);
}

}  // namespace stochnorm_ext::cuda
