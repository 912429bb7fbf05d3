// Grouped matrix products on the CPU, one group per thread.
//
// The rows of x are split into consecutive groups: group g owns rows
// ends[g-1]:ends[g] (the first group starts at row 0). Operators (namespace
// inhibmoe_fast):
//   grouped_mm_rows(x [M, in], weight [G, out, in], ends) -> [M, out]
//       rows of g times weight[g]^T
//   grouped_mm_weight_grad(grad_y [M, out], x [M, in], ends) -> [G, out, in]
//       (grad_y rows of g)^T times (x rows of g); zero for an empty group
//
// With a few hundred rows per group, one BLAS call per group on one thread
// keeps every thread busy on its own product. On a 2-core AMD EPYC, this and
// the one-pass SwiGLU made a layer step 1.14x to 1.16x faster than PyTorch's
// grouped_mm and SwiGLU (benchmarks/RESULTS.md). NOTE: other CPUs are unmeasured.
// The threads take the groups largest first from a shared counter, so a few
// large groups do not leave a thread idle at the end. Inside the parallel
// region each product is a single-threaded at::mm_out, so a group's result
// does not depend on which thread ran it.
// Inputs may have any strides, and outputs are contiguous.

#include <algorithm>
#include <atomic>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace inhibmoe_fast {

namespace {

void check_groups(const at::Tensor& rows, at::IntArrayRef ends, int64_t groups, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == groups, op, ": ends has ", ends.size(),
              " entries; expected ", groups, " (one end per group)");
  int64_t previous = 0;
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(ends[g] >= previous, op, ": ends must be non-decreasing and start at 0 or more; ends[", g,
                "] = ", ends[g], " follows ", previous);
    previous = ends[g];
  }
  TORCH_CHECK(previous == rows.size(0), op, ": the last end is ", previous, " but the input has ", rows.size(0),
              " rows; they must be equal");
}

void check_operands(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": expected CPU tensors, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": the operands have dtypes ", a.scalar_type(), " and ",
              b.scalar_type(), "; they must be equal");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": expected floating-point tensors, got ",
              a.scalar_type());
}

// Runs product(g) for every non-empty group, largest first, on all intra-op threads.
template <typename Product>
void for_each_group(at::IntArrayRef ends, Product product) {
  const int64_t groups = static_cast<int64_t>(ends.size());
  std::vector<int64_t> starts(groups);
  std::vector<int64_t> order;
  order.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) {
    starts[g] = g == 0 ? 0 : ends[g - 1];
    if (ends[g] > starts[g]) {
      order.push_back(g);
    }
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t p, int64_t q) { return ends[p] - starts[p] > ends[q] - starts[q]; });
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(order.size()));
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state: skip autograd there, since the
    // inputs may require grad and out= products are not differentiable.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < static_cast<int64_t>(order.size()); i = next++) {
      const int64_t g = order[i];
      product(g, starts[g], ends[g]);
    }
  });
}

at::Tensor grouped_mm_rows_cpu(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef ends) {
  const char* op = "grouped_mm_rows";
  check_operands(x, weight, op);
  TORCH_CHECK(x.dim() == 2, op, ": x has shape ", x.sizes(), "; expected a 2-D tensor [M, in]");
  TORCH_CHECK(weight.dim() == 3, op, ": weight has shape ", weight.sizes(), "; expected [G, out, in]");
  TORCH_CHECK(x.size(1) == weight.size(2), op, ": x has ", x.size(1), " columns but weight has in=",
              weight.size(2), "; they must be equal");
  check_groups(x, ends, weight.size(0), op);
  at::Tensor out = at::empty({x.size(0), weight.size(1)}, x.options());
  for_each_group(ends, [&](int64_t g, int64_t start, int64_t end) {
    at::Tensor rows = out.slice(0, start, end);
    at::mm_out(rows, x.slice(0, start, end), weight[g].t());
  });
  return out;
}

at::Tensor grouped_mm_weight_grad_cpu(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef ends) {
  const char* op = "grouped_mm_weight_grad";
  check_operands(grad_y, x, op);
  TORCH_CHECK(grad_y.dim() == 2 && x.dim() == 2 && grad_y.size(0) == x.size(0), op, ": grad_y has shape ",
              grad_y.sizes(), " and x ", x.sizes(), "; expected [M, out] and [M, in]");
  const int64_t groups = static_cast<int64_t>(ends.size());
  check_groups(x, ends, groups, op);
  at::Tensor grad_weight = at::empty({groups, grad_y.size(1), x.size(1)}, x.options());
  for (int64_t g = 0; g < groups; ++g) {
    if (ends[g] == (g == 0 ? 0 : ends[g - 1])) {
      grad_weight[g].zero_();
    }
  }
  for_each_group(ends, [&](int64_t g, int64_t start, int64_t end) {
    at::Tensor block = grad_weight[g];
    at::mm_out(block, grad_y.slice(0, start, end).t(), x.slice(0, start, end));
  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inhibmoe_fast, m) {
  m.def("grouped_mm_rows(Tensor x, Tensor weight, int[] ends) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor grad_y, Tensor x, int[] ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(inhibmoe_fast, CPU, m) {
  m.impl("grouped_mm_rows", &grouped_mm_rows_cpu);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_cpu);
}

}  // namespace inhibmoe_fast
