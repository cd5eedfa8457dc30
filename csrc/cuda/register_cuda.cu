// Registers the CUDA kernels of every stochnorm_ext device op: CudaDevice describes a CUDA GPU
// to the op implementations of csrc/ops_impl.h (written once for every device; schemas:
// csrc/ops.cpp; fake tensors: stochnorm_ext/backend/compiled/ops.py; autograd:
// csrc/autograd.cpp, shared by all devices): the four passes of the CUDA core
// (segment_core.h), and the two generic kernels that run the coefficient steps of
// csrc/coefficients.h, one thread per index (per_index_kernel) or one block per unit with a
// block reduction (per_unit_kernel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops_impl.h"
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

// A unit step (coefficients.h), one block per unit (grid-stride over units): each thread
// combines the partials of the members it strides over, the block combines the threads'
// results in shared memory (a tree over a power-of-two block), then every member is finished
// with the unit's total. No thread loops over a whole unit, whatever its size.
template <typename Step, typename Args>
__global__ void per_unit_kernel(int64_t units, int64_t members, Args args) {
  using Partial = typename Step::Partial;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Partial* partials = reinterpret_cast<Partial*>(shared_bytes);
  const Step step;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    Partial mine{};
    for (int64_t m = threadIdx.x; m < members; m += blockDim.x) mine = Partial::combine(mine, step.partial(u, m, args));
    partials[threadIdx.x] = mine;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) partials[threadIdx.x] = Partial::combine(partials[threadIdx.x], partials[threadIdx.x + stride]);
      __syncthreads();
    }
    const Partial total = partials[0];
    for (int64_t m = threadIdx.x; m < members; m += blockDim.x) step.finish(u, m, total, args);
    __syncthreads();  // every thread has read partials[0] before the next unit overwrites it
  }
}

// Units of one member: one thread per unit, as for_each_index.
template <typename Step, typename Args>
__global__ void single_member_kernel(int64_t units, Args args) {
  const Step step;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += int64_t(gridDim.x) * blockDim.x) {
    step.finish(u, 0, step.partial(u, 0, args), args);
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

  template <typename Step, typename Args>
  static void for_each_unit(int64_t units, int64_t members, const Args& args) {
    if (units <= 0) return;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (members == 1) {
      constexpr int kThreads = 128;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(units, kThreads), 65535));
      single_member_kernel<Step, Args><<<blocks, kThreads, 0, stream>>>(units, args);
    } else {
      int threads = 32;  // a power of two (the tree), whole warps, at most 256
      while (threads < members && threads < 256) threads *= 2;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(units, 65535));
      const size_t shared = size_t(threads) * sizeof(typename Step::Partial);
      per_unit_kernel<Step, Args><<<blocks, threads, shared, stream>>>(units, members, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(stochnorm_ext, CUDA, m) {
  ops_impl::register_kernels<CudaDevice>(m);
}

}  // namespace stochnorm_ext::cuda
