// maxpool_align operators: CUDA kernels.
//
// Same rules as the CPU kernels (see maxpool_align.h), so both devices return
// the same bits. One thread computes one output element: in the forward pass it
// scans the rows of its window, in the backward pass it walks the windows that
// contain its row, so the backward needs no atomics. Every source of the
// multi-source op is handled by the same launch, one grid row (blockIdx.y) per
// source.
//
// NOTE: bit equality with the CPU kernels is checked by the CUDA tests in
// tests/test_maxpool_align.py, which skip on machines without a GPU.
//
// Limit: one launch takes up to kMaxSourcesPerLaunch sources (the kernel
// parameter block holds their descriptions); more sources take more launches.

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "maxpool_align.h"

namespace inhibmoe_fast {

namespace {

constexpr int kThreadsPerBlock = 256;
// Up to 32 descriptions of 48 bytes each fit well inside the 4 KiB kernel parameter limit.
constexpr int kMaxSourcesPerLaunch = 32;
// Grid-stride loops cover the rest when a source has more elements than this many blocks hold.
constexpr int64_t kMaxBlocksX = 65535;

struct SourceBatch {
  SourceArgs sources[kMaxSourcesPerLaunch];
  int count;
};

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// values, indices: [n_out, out_stride_row] contiguous outputs.
template <typename scalar_t>
__global__ void forward_kernel(SourceBatch batch, int64_t n_out, int64_t out_stride_row, scalar_t* values,
                               int64_t* indices) {
  using opmath_t = at::opmath_type<scalar_t>;
  const SourceArgs src = batch.sources[blockIdx.y];
  const scalar_t* x = static_cast<const scalar_t*>(src.data);
  const int64_t numel = n_out * src.cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Neighbouring threads take neighbouring columns, so row reads coalesce for row-major inputs.
    const int64_t w = e / src.cols;
    const int64_t c = e % src.cols;
    const int64_t begin = window_begin(w, src.rows, n_out);
    const int64_t end = window_end(w, src.rows, n_out);
    const scalar_t* column = x + c * src.stride_col;
    opmath_t best = static_cast<opmath_t>(column[begin * src.stride_row]);
    int64_t best_row = begin;
    for (int64_t r = begin + 1; r < end; ++r) {
      const opmath_t v = static_cast<opmath_t>(column[r * src.stride_row]);
      // A greater value or a NaN (v != v) replaces the maximum, as on the CPU.
      if (v > best || v != v) {
        best = v;
        best_row = r;
      }
    }
    const int64_t out = w * out_stride_row + src.col_offset + c;
    values[out] = static_cast<scalar_t>(best);
    indices[out] = best_row;
  }
}

// batch.sources describe the contiguous gradients being written, one per source.
template <typename scalar_t>
__global__ void backward_kernel(SourceBatch batch, int64_t n_out, const scalar_t* grad_values,
                                int64_t grad_stride_row, int64_t grad_stride_col, const int64_t* indices,
                                int64_t index_stride_row, int64_t index_stride_col) {
  const SourceArgs dst = batch.sources[blockIdx.y];
  scalar_t* grad_x = static_cast<scalar_t*>(dst.data);
  const int64_t numel = dst.rows * dst.cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / dst.cols;
    const int64_t c = dst.col_offset + e % dst.cols;
    // Add in scalar_t in increasing window order, like the CPU kernel: float16
    // and bfloat16 round after every addition.
    scalar_t sum = scalar_t(0);
    if (n_out > 0) {
      const int64_t i_end = last_window_end(r, dst.rows, n_out);
      for (int64_t i = first_window(r, dst.rows, n_out); i < i_end; ++i) {
        if (indices[i * index_stride_row + c * index_stride_col] == r) {
          sum = sum + grad_values[i * grad_stride_row + c * grad_stride_col];
        }
      }
    }
    grad_x[e] = sum;
  }
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

// Calls launch(batch, max_elements) for each group of up to kMaxSourcesPerLaunch
// sources; elements_of(source) counts the elements one thread grid must cover.
template <typename Launch, typename Elements>
void for_each_batch(const std::vector<SourceArgs>& args, Elements elements_of, Launch launch) {
  for (size_t first = 0; first < args.size(); first += kMaxSourcesPerLaunch) {
    SourceBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(kMaxSourcesPerLaunch, args.size() - first));
    int64_t max_elements = 0;
    for (int s = 0; s < batch.count; ++s) {
      batch.sources[s] = args[first + s];
      max_elements = std::max(max_elements, elements_of(batch.sources[s]));
    }
    if (max_elements > 0) {
      launch(batch, max_elements);
    }
  }
}

dim3 grid_for(int64_t max_elements, int count) {
  const int64_t blocks = std::min<int64_t>((max_elements + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocksX);
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(count));
}

std::tuple<at::Tensor, at::Tensor> multi_forward_cuda(const std::vector<at::Tensor>& sources, int64_t n_out,
                                                       const char* op_name) {
  ForwardOutputs out = prepare_forward(sources, n_out, op_name);
  TORCH_CHECK(sources[0].is_cuda(), op_name, ": sources are on ", sources[0].device(),
              "; the CUDA kernel expects CUDA tensors");
  const c10::cuda::CUDAGuard guard(sources[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<SourceArgs> args = describe_sources(sources);
  const int64_t out_stride_row = out.values.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.values.scalar_type(), "maxpool_align_forward", [&] {
    scalar_t* values = out.values.data_ptr<scalar_t>();
    int64_t* indices = out.indices.data_ptr<int64_t>();
    for_each_batch(
        args, [&](const SourceArgs& src) { return n_out * src.cols; },
        [&](const SourceBatch& batch, int64_t max_elements) {
          forward_kernel<scalar_t><<<grid_for(max_elements, batch.count), kThreadsPerBlock, 0, stream>>>(
              batch, n_out, out_stride_row, values, indices);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return {out.values, out.indices};
}

std::vector<at::Tensor> multi_backward_cuda(const at::Tensor& grad_values, const at::Tensor& indices,
                                            c10::ArrayRef<int64_t> n_in, c10::ArrayRef<int64_t> widths,
                                            const char* op_name) {
  std::vector<at::Tensor> grads = prepare_backward(grad_values, indices, n_in, widths, op_name);
  TORCH_CHECK(grad_values.is_cuda(), op_name, ": grad_values is on ", grad_values.device(),
              "; the CUDA kernel expects CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<SourceArgs> args = describe_sources(grads);
  const int64_t n_out = grad_values.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_values.scalar_type(), "maxpool_align_backward", [&] {
    const scalar_t* g = grad_values.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    for_each_batch(
        args, [](const SourceArgs& dst) { return dst.rows * dst.cols; },
        [&](const SourceBatch& batch, int64_t max_elements) {
          backward_kernel<scalar_t><<<grid_for(max_elements, batch.count), kThreadsPerBlock, 0, stream>>>(
              batch, n_out, g, grad_values.stride(0), grad_values.stride(1), idx, indices.stride(0),
              indices.stride(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor> maxpool_align_cuda(const at::Tensor& x, int64_t n_out) {
  return multi_forward_cuda({x}, n_out, "maxpool_align");
}

at::Tensor maxpool_align_backward_cuda(const at::Tensor& grad_values, const at::Tensor& indices, int64_t n_in) {
  const int64_t width = grad_values.dim() == 2 ? grad_values.size(1) : 0;
  return multi_backward_cuda(grad_values, indices, {n_in}, {width}, "maxpool_align_backward")[0];
}

std::tuple<at::Tensor, at::Tensor> maxpool_align_multi_cuda(at::TensorList sources, int64_t n_out) {
  return multi_forward_cuda(sources.vec(), n_out, "maxpool_align_multi");
}

std::vector<at::Tensor> maxpool_align_multi_backward_cuda(const at::Tensor& grad_values, const at::Tensor& indices,
                                                          at::IntArrayRef n_in, at::IntArrayRef widths) {
  return multi_backward_cuda(grad_values, indices, n_in, widths, "maxpool_align_multi_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(inhibmoe_fast, CUDA, m) {
  m.impl("maxpool_align", &maxpool_align_cuda);
  m.impl("maxpool_align_backward", &maxpool_align_backward_cuda);
  m.impl("maxpool_align_multi", &maxpool_align_multi_cuda);
  m.impl("maxpool_align_multi_backward", &maxpool_align_multi_backward_cuda);
}

}  // namespace inhibmoe_fast
