// maxpool_align operators: schema, input checks and CPU kernels.
//
// The window rules, tie and NaN handling and the summation order of the
// backward pass are described in maxpool_align.h. The CUDA kernels live in
// maxpool_align_cuda.cu and share the checks defined here.
//
// Operators (namespace inhibmoe_fast):
//   maxpool_align(x [N_in, C], n_out) -> (values [n_out, C], indices int64 [n_out, C])
//   maxpool_align_backward(grad_values, indices, n_in) -> grad_x [n_in, C]
//   maxpool_align_multi(sources, n_out) -> values and indices with the sources' columns side by side
//   maxpool_align_multi_backward(grad_values, indices, n_in[], widths[]) -> one gradient per source
// Inputs may have any strides and storage offset; outputs are contiguous.

#include <Python.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "maxpool_align.h"

namespace inhibmoe_fast {

namespace {

// Columns handled by one CPU task, so that the running maxima of a block stay in L1.
constexpr int64_t kColumnBlock = 256;
// Approximate element reads per CPU task, so small problems stay on one thread.
constexpr int64_t kTaskWork = 32768;

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

std::string source_name(bool single_source, size_t i) {
  return single_source ? std::string("x") : "sources[" + std::to_string(i) + "]";
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace

ForwardOutputs prepare_forward(const std::vector<at::Tensor>& sources, int64_t n_out, const char* op_name) {
  const bool single_source = std::string(op_name) == "maxpool_align";
  TORCH_CHECK(!sources.empty(), op_name, ": sources is empty; expected at least one [N_in, C] tensor");
  TORCH_CHECK(n_out >= 0, op_name, ": n_out=", n_out, " is invalid; expected n_out >= 0");
  int64_t total_width = 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& x = sources[i];
    const std::string name = source_name(single_source, i);
    TORCH_CHECK(x.defined(), op_name, ": ", name, " is an undefined tensor");
    TORCH_CHECK(x.dim() == 2, op_name, ": ", name, " has shape ", x.sizes(), "; expected a 2-D tensor [N_in, C]");
    TORCH_CHECK(is_supported_dtype(x.scalar_type()), op_name, ": ", name, " has dtype ", x.scalar_type(),
                "; expected a floating dtype (float64, float32, float16 or bfloat16)");
    TORCH_CHECK(x.size(0) > 0, op_name, ": ", name, " has shape ", x.sizes(),
                ", i.e. N_in=0 rows; expected at least one row");
    TORCH_CHECK(x.scalar_type() == sources[0].scalar_type() && x.device() == sources[0].device(), op_name, ": ",
                name, " is ", x.scalar_type(), " on ", x.device(), " but sources[0] is ", sources[0].scalar_type(),
                " on ", sources[0].device(), "; all sources must share one dtype and device");
    total_width += x.size(1);
  }
  const auto options = sources[0].options();
  return {at::empty({n_out, total_width}, options), at::empty({n_out, total_width}, options.dtype(at::kLong))};
}

std::vector<at::Tensor> prepare_backward(const at::Tensor& grad_values, const at::Tensor& indices,
                                         c10::ArrayRef<int64_t> n_in, c10::ArrayRef<int64_t> widths,
                                         const char* op_name) {
  TORCH_CHECK(grad_values.dim() == 2, op_name, ": grad_values has shape ", grad_values.sizes(),
              "; expected a 2-D tensor [n_out, C]");
  TORCH_CHECK(is_supported_dtype(grad_values.scalar_type()), op_name, ": grad_values has dtype ",
              grad_values.scalar_type(), "; expected float64, float32, float16 or bfloat16");
  TORCH_CHECK(indices.sizes() == grad_values.sizes(), op_name, ": indices has shape ", indices.sizes(),
              " but grad_values has shape ", grad_values.sizes(), "; expected equal shapes");
  TORCH_CHECK(indices.scalar_type() == at::kLong, op_name, ": indices has dtype ", indices.scalar_type(),
              "; expected int64");
  TORCH_CHECK(indices.device() == grad_values.device(), op_name, ": indices is on ", indices.device(),
              " but grad_values is on ", grad_values.device(), "; expected one device");
  TORCH_CHECK(n_in.size() == widths.size() && !n_in.empty(), op_name, ": n_in has ", n_in.size(),
              " entries and widths has ", widths.size(), "; expected the same number, at least one");
  int64_t total_width = 0;
  std::vector<at::Tensor> grads;
  grads.reserve(n_in.size());
  for (size_t s = 0; s < n_in.size(); ++s) {
    TORCH_CHECK(n_in[s] > 0, op_name, ": n_in[", s, "]=", n_in[s], " is invalid; expected at least one row");
    TORCH_CHECK(widths[s] >= 0, op_name, ": widths[", s, "]=", widths[s], " is invalid; expected >= 0");
    total_width += widths[s];
    grads.push_back(at::empty({n_in[s], widths[s]}, grad_values.options()));
  }
  TORCH_CHECK(total_width == grad_values.size(1), op_name, ": widths sum to ", total_width,
              " but grad_values has ", grad_values.size(1), " columns; expected them to match");
  return grads;
}

std::vector<SourceArgs> describe_sources(const std::vector<at::Tensor>& sources) {
  std::vector<SourceArgs> args;
  args.reserve(sources.size());
  int64_t col_offset = 0;
  for (const at::Tensor& x : sources) {
    args.push_back({x.data_ptr(), x.size(0), x.size(1), x.stride(0), x.stride(1), col_offset});
    col_offset += x.size(1);
  }
  return args;
}

namespace {

// ---------------------------------------------------------------------------
// CPU forward
// ---------------------------------------------------------------------------

// Pools columns [col_begin, col_end) of window w, reading a block of columns of
// each row in turn. row_t is the type of a row offset inside the window, and
// int32 lets the compiler vectorize it in step with float32 values.
template <typename scalar_t, typename row_t, bool kUnitColStride>
void forward_window_rowwise(const scalar_t* x, const SourceArgs& src, int64_t w, int64_t n_out, int64_t col_begin,
                            int64_t col_end, scalar_t* values, int64_t* indices) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t col_stride = kUnitColStride ? 1 : src.stride_col;
  const int64_t begin = window_begin(w, src.rows, n_out);
  const int64_t end = window_end(w, src.rows, n_out);
  const int64_t width = col_end - col_begin;
  opmath_t best[kColumnBlock];
  row_t best_row[kColumnBlock];

  const scalar_t* row = x + begin * src.stride_row + col_begin * col_stride;
  for (int64_t c = 0; c < width; ++c) {
    best[c] = static_cast<opmath_t>(row[c * col_stride]);
    best_row[c] = 0;
  }
  for (int64_t r = begin + 1; r < end; ++r) {
    row = x + r * src.stride_row + col_begin * col_stride;
    const row_t offset = static_cast<row_t>(r - begin);
    for (int64_t c = 0; c < width; ++c) {
      const opmath_t v = static_cast<opmath_t>(row[c * col_stride]);
      // A greater value or a NaN (v != v) replaces the maximum, as in PyTorch's CPU results.
      const bool take = (v > best[c]) | (v != v);
      best[c] = take ? v : best[c];
      best_row[c] = take ? offset : best_row[c];
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    values[c] = static_cast<scalar_t>(best[c]);
    indices[c] = begin + static_cast<int64_t>(best_row[c]);
  }
}

// Pools columns [col_begin, col_end) of window w one column at a time, for
// inputs whose rows are closer together in memory than their columns.
template <typename scalar_t>
void forward_window_columnwise(const scalar_t* x, const SourceArgs& src, int64_t w, int64_t n_out,
                               int64_t col_begin, int64_t col_end, scalar_t* values, int64_t* indices) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t begin = window_begin(w, src.rows, n_out);
  const int64_t end = window_end(w, src.rows, n_out);
  for (int64_t c = col_begin; c < col_end; ++c) {
    const scalar_t* column = x + c * src.stride_col;
    opmath_t best = static_cast<opmath_t>(column[begin * src.stride_row]);
    int64_t best_row = begin;
    for (int64_t r = begin + 1; r < end; ++r) {
      const opmath_t v = static_cast<opmath_t>(column[r * src.stride_row]);
      if (v > best || v != v) {
        best = v;
        best_row = r;
      }
    }
    values[c - col_begin] = static_cast<scalar_t>(best);
    indices[c - col_begin] = best_row;
  }
}

template <typename scalar_t>
void forward_source_cpu(const SourceArgs& src, int64_t n_out, scalar_t* values, int64_t* indices,
                        int64_t out_stride_row) {
  if (n_out == 0 || src.cols == 0) {
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(src.data);
  const int64_t n_blocks = ceil_div(src.cols, kColumnBlock);
  const int64_t max_window = ceil_div(src.rows, n_out) + 1;
  const int64_t grain = std::max<int64_t>(1, kTaskWork / (max_window * std::min(src.cols, kColumnBlock)));
  const bool columnwise = src.stride_col != 1 && std::abs(src.stride_row) < std::abs(src.stride_col);
  const bool small_windows = max_window <= std::numeric_limits<int32_t>::max();

  at::parallel_for(0, n_out * n_blocks, grain, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t w = task / n_blocks;
      const int64_t col_begin = (task % n_blocks) * kColumnBlock;
      const int64_t col_end = std::min(col_begin + kColumnBlock, src.cols);
      scalar_t* out_values = values + w * out_stride_row + src.col_offset + col_begin;
      int64_t* out_indices = indices + w * out_stride_row + src.col_offset + col_begin;
      if (columnwise) {
        forward_window_columnwise(x, src, w, n_out, col_begin, col_end, out_values, out_indices);
      } else if (src.stride_col == 1 && small_windows) {
        forward_window_rowwise<scalar_t, int32_t, true>(x, src, w, n_out, col_begin, col_end, out_values,
                                                        out_indices);
      } else {
        forward_window_rowwise<scalar_t, int64_t, false>(x, src, w, n_out, col_begin, col_end, out_values,
                                                         out_indices);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// CPU backward
// ---------------------------------------------------------------------------

// Fills rows [row_begin, row_end) x columns [col_begin, col_end) of one source's
// gradient: zeroes the block, then walks the windows that overlap those rows in
// increasing order and adds each grad_values[i, c] whose index falls inside the
// block. Every element thus receives its terms in increasing window order, added
// in scalar_t (float16 and bfloat16 round after each addition as PyTorch does),
// and no other task writes it.
template <typename scalar_t>
void backward_block(const scalar_t* grad_values, const int64_t* indices, int64_t grad_stride_row,
                    int64_t grad_stride_col, int64_t index_stride_row, int64_t index_stride_col, int64_t n_in,
                    int64_t n_out, int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,
                    scalar_t* grad_x, int64_t grad_x_stride_row) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    std::fill(grad_x + r * grad_x_stride_row + col_begin, grad_x + r * grad_x_stride_row + col_end, scalar_t(0));
  }
  if (n_out == 0) {
    return;
  }
  const int64_t i_end = last_window_end(row_end - 1, n_in, n_out);
  for (int64_t i = first_window(row_begin, n_in, n_out); i < i_end; ++i) {
    const scalar_t* g = grad_values + i * grad_stride_row;
    const int64_t* idx = indices + i * index_stride_row;
    for (int64_t c = col_begin; c < col_end; ++c) {
      const int64_t r = idx[c * index_stride_col];
      if (r >= row_begin && r < row_end) {
        scalar_t& target = grad_x[r * grad_x_stride_row + c];
        target = target + g[c * grad_stride_col];
      }
    }
  }
}

template <typename scalar_t>
void backward_source_cpu(const at::Tensor& grad_values, const at::Tensor& indices, const SourceArgs& dst,
                         int64_t n_out) {
  if (dst.cols == 0) {
    return;
  }
  // Columns of this source inside grad_values and indices.
  const scalar_t* g = grad_values.const_data_ptr<scalar_t>() + dst.col_offset * grad_values.stride(1);
  const int64_t* idx = indices.const_data_ptr<int64_t>() + dst.col_offset * indices.stride(1);
  scalar_t* grad_x = static_cast<scalar_t*>(dst.data);
  const int64_t n_col_blocks = ceil_div(dst.cols, kColumnBlock);
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskWork / std::min(dst.cols, kColumnBlock));
  const int64_t n_row_blocks = ceil_div(dst.rows, rows_per_task);

  at::parallel_for(0, n_row_blocks * n_col_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t row_begin = (task / n_col_blocks) * rows_per_task;
      const int64_t row_end = std::min(row_begin + rows_per_task, dst.rows);
      const int64_t col_begin = (task % n_col_blocks) * kColumnBlock;
      const int64_t col_end = std::min(col_begin + kColumnBlock, dst.cols);
      backward_block(g, idx, grad_values.stride(0), grad_values.stride(1), indices.stride(0), indices.stride(1),
                     dst.rows, n_out, row_begin, row_end, col_begin, col_end, grad_x, dst.cols);
    }
  });
}

// ---------------------------------------------------------------------------
// CPU operator implementations
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> multi_forward_cpu(const std::vector<at::Tensor>& sources, int64_t n_out,
                                                      const char* op_name) {
  ForwardOutputs out = prepare_forward(sources, n_out, op_name);
  const std::vector<SourceArgs> args = describe_sources(sources);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.values.scalar_type(), "maxpool_align_forward", [&] {
    for (const SourceArgs& src : args) {
      forward_source_cpu<scalar_t>(src, n_out, out.values.data_ptr<scalar_t>(), out.indices.data_ptr<int64_t>(),
                                   out.values.size(1));
    }
  });
  return {out.values, out.indices};
}

std::vector<at::Tensor> multi_backward_cpu(const at::Tensor& grad_values, const at::Tensor& indices,
                                           c10::ArrayRef<int64_t> n_in, c10::ArrayRef<int64_t> widths,
                                           const char* op_name) {
  std::vector<at::Tensor> grads = prepare_backward(grad_values, indices, n_in, widths, op_name);
  TORCH_CHECK(grad_values.device().is_cpu(), op_name, ": grad_values is on ", grad_values.device(),
              "; the CPU kernel expects CPU tensors");
  const std::vector<SourceArgs> args = describe_sources(grads);
  const int64_t n_out = grad_values.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_values.scalar_type(), "maxpool_align_backward", [&] {
    for (const SourceArgs& dst : args) {
      backward_source_cpu<scalar_t>(grad_values, indices, dst, n_out);
    }
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor> maxpool_align_cpu(const at::Tensor& x, int64_t n_out) {
  return multi_forward_cpu({x}, n_out, "maxpool_align");
}

at::Tensor maxpool_align_backward_cpu(const at::Tensor& grad_values, const at::Tensor& indices, int64_t n_in) {
  const int64_t width = grad_values.dim() == 2 ? grad_values.size(1) : 0;
  return multi_backward_cpu(grad_values, indices, {n_in}, {width}, "maxpool_align_backward")[0];
}

std::tuple<at::Tensor, at::Tensor> maxpool_align_multi_cpu(at::TensorList sources, int64_t n_out) {
  return multi_forward_cpu(sources.vec(), n_out, "maxpool_align_multi");
}

std::vector<at::Tensor> maxpool_align_multi_backward_cpu(const at::Tensor& grad_values, const at::Tensor& indices,
                                                         at::IntArrayRef n_in, at::IntArrayRef widths) {
  return multi_backward_cpu(grad_values, indices, n_in, widths, "maxpool_align_multi_backward");
}

}  // namespace

TORCH_LIBRARY(inhibmoe_fast, m) {
  m.def("maxpool_align(Tensor x, SymInt n_out) -> (Tensor values, Tensor indices)");
  m.def("maxpool_align_backward(Tensor grad_values, Tensor indices, SymInt n_in) -> Tensor");
  m.def("maxpool_align_multi(Tensor[] sources, SymInt n_out) -> (Tensor values, Tensor indices)");
  m.def(
      "maxpool_align_multi_backward(Tensor grad_values, Tensor indices, SymInt[] n_in, SymInt[] widths) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(inhibmoe_fast, CPU, m) {
  m.impl("maxpool_align", &maxpool_align_cpu);
  m.impl("maxpool_align_backward", &maxpool_align_backward_cpu);
  m.impl("maxpool_align_multi", &maxpool_align_multi_cpu);
  m.impl("maxpool_align_multi_backward", &maxpool_align_multi_backward_cpu);
}

}  // namespace inhibmoe_fast

// Importing inhibmoe_fast._C runs the registrations above. The module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "maxpool_align operators (torch.ops.inhibmoe_fast)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
