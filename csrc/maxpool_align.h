// maxpool_align: adaptive max-pooling over the row axis of [N_in, C] sources.
//
// Output row i of a source with N_in rows covers the input rows
// [floor(i * N_in / n_out), ceil((i + 1) * N_in / n_out)). Neighbouring windows
// share a row whenever N_in / n_out is not an integer, and many rows when
// n_out > N_in. Values and indices equal those of the CPU kernel of
// torch.nn.functional.adaptive_max_pool1d applied to x.t():
//   - the running maximum starts at the window's first row and is replaced by a
//     row whose value is greater or is NaN. So ties keep the first row, and a
//     window with NaN reports its last NaN row.
//   - the backward pass adds grad_values[i, c] into grad_x[indices[i, c], c] in
//     increasing i, starting from +0, and rounds to the tensor's dtype after every
//     addition. PyTorch 2.14 rounds each `+=` of float16 and bfloat16 the same way.
// Each backward thread owns one element of grad_x and walks the windows that
// contain its row, so no atomics are needed and every run gives the same bits.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#if defined(__CUDACC__)
#define INHIBMOE_HOST_DEVICE __host__ __device__
#else
#define INHIBMOE_HOST_DEVICE
#endif

namespace inhibmoe_fast {

// First input row of output window i.
INHIBMOE_HOST_DEVICE inline int64_t window_begin(int64_t i, int64_t n_in, int64_t n_out) {
  return (i * n_in) / n_out;
}

// One past the last input row of output window i.
INHIBMOE_HOST_DEVICE inline int64_t window_end(int64_t i, int64_t n_in, int64_t n_out) {
  return ((i + 1) * n_in + n_out - 1) / n_out;
}

// First output window that contains input row r. The windows containing r are
// [first_window(r), last_window_end(r)), never empty when n_out > 0, because
// window_begin(i) <= r  <=>  i < ceil((r + 1) * n_out / n_in) and
// window_end(i) > r     <=>  i >= floor(r * n_out / n_in).
INHIBMOE_HOST_DEVICE inline int64_t first_window(int64_t r, int64_t n_in, int64_t n_out) {
  return (r * n_out) / n_in;
}

// One past the last output window that contains input row r.
INHIBMOE_HOST_DEVICE inline int64_t last_window_end(int64_t r, int64_t n_in, int64_t n_out) {
  return ((r + 1) * n_out + n_in - 1) / n_in;
}

// One source of the multi-source op, or one gradient block of its backward.
// It is a [rows, cols] matrix with element (r, c) at data + r * stride_row + c * stride_col.
// Its columns are [col_offset, col_offset + cols) of the concatenated output.
struct SourceArgs {
  void* data;
  int64_t rows;
  int64_t cols;
  int64_t stride_row;
  int64_t stride_col;
  int64_t col_offset;
};

// Outputs of the forward pass, allocated by prepare_forward.
struct ForwardOutputs {
  at::Tensor values;   // [n_out, sum of widths], dtype of the sources
  at::Tensor indices;  // [n_out, sum of widths], int64 row numbers into each source
};

// Validates the sources and n_out, and allocates contiguous outputs on the
// sources' device. Raises c10::Error naming the argument and the value.
ForwardOutputs prepare_forward(const std::vector<at::Tensor>& sources, int64_t n_out, const char* op_name);

// Validates the backward inputs and allocates one contiguous [n_in[s], widths[s]]
// gradient per source, in the dtype of grad_values.
std::vector<at::Tensor> prepare_backward(const at::Tensor& grad_values, const at::Tensor& indices,
                                         c10::ArrayRef<int64_t> n_in, c10::ArrayRef<int64_t> widths,
                                         const char* op_name);

// Describes source tensors (or gradient blocks) as SourceArgs, columns laid side by side.
std::vector<SourceArgs> describe_sources(const std::vector<at::Tensor>& sources);

}  // namespace inhibmoe_fast
