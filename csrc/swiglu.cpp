// SwiGLU on a fused up projection, forward and backward, on the CPU.
//
// projected [R, 2F] contains the gate half g = projected[:, :F] and the linear half
// u = projected[:, F:]. Operators (namespace inhibmoe_fast):
//   swiglu(projected) -> hidden [R, F] = silu(g) * u
//   swiglu_backward(grad_hidden [R, F], projected) -> grad_projected [R, 2F]
//       grad_g = grad_hidden * u * s * (1 + g * (1 - s)), grad_u = grad_hidden * silu(g)
// with s = sigmoid(g) and silu(g) = g / (1 + exp(-g)), the formulas of PyTorch's
// silu and silu_backward. Each pass reads and writes every element once, where
// the same computation from PyTorch operations takes three to five passes.
//
// float32 runs a loop the compiler vectorizes, with its own exp (below). On
// x86-64 Linux that loop is also compiled for AVX2, and the AVX2 version is
// picked at load time when the CPU has AVX2. Other dtypes compute each element
// in their opmath type with std::exp. Inputs may have any strides, and outputs
// are contiguous.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define INHIBMOE_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define INHIBMOE_TARGET_CLONES
#endif

namespace inhibmoe_fast {

namespace {

// Approximate element operations per CPU task.
constexpr int64_t kTaskWork = 32768;

// exp(x) for float32, written without calls or branches so that loops over it
// vectorize. x = n ln2 + r with |r| <= ln2 / 2, then exp(r) by its degree-7 Taylor
// polynomial (truncation error below 1e-8 relative) and 2^n by the exponent bits.
// NaN stays NaN, and results overflow to inf where float does (above 88.72283).
// Results below exp(-86) flush to 0. silu and its gradient only add them to 1,
// which they do not change.
inline float exp_float(float x) {
  const float clamped = x < -86.0f ? -86.0f : (x > 88.72283f ? 88.72283f : x);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln 2 in two parts, so that n times the first part is exact.
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^(n-1), then times 2: n reaches 128 at the top of the range, and 2^128 is not a float.
  const int32_t bits = (static_cast<int32_t>(n) + 126) << 23;
  float half_scale;
  std::memcpy(&half_scale, &bits, sizeof(half_scale));
  float result = p * half_scale * 2.0f;
  result = x > 88.72283f ? std::numeric_limits<float>::infinity() : result;
  result = x < -86.0f ? 0.0f : result;
  return x != x ? x : result;
}

INHIBMOE_TARGET_CLONES
void swiglu_rows_float(const float* __restrict projected, float* __restrict hidden, int64_t rows, int64_t width) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* gate = projected + row * 2 * width;
    const float* linear = gate + width;
    float* out = hidden + row * width;
    for (int64_t j = 0; j < width; ++j) {
      const float g = gate[j];
      out[j] = g / (1.0f + exp_float(-g)) * linear[j];
    }
  }
}

INHIBMOE_TARGET_CLONES
void swiglu_backward_rows_float(const float* __restrict grad_hidden, const float* __restrict projected,
                                float* __restrict grad_projected,
                                int64_t rows, int64_t width) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* gate = projected + row * 2 * width;
    const float* linear = gate + width;
    const float* grad = grad_hidden + row * width;
    float* grad_gate = grad_projected + row * 2 * width;
    float* grad_linear = grad_gate + width;
    for (int64_t j = 0; j < width; ++j) {
      const float g = gate[j];
      const float s = 1.0f / (1.0f + exp_float(-g));
      grad_gate[j] = grad[j] * linear[j] * (s * (1.0f + g * (1.0f - s)));
      grad_linear[j] = grad[j] * (g * s);
    }
  }
}

template <typename scalar_t>
void swiglu_rows(const scalar_t* projected, scalar_t* hidden, int64_t rows, int64_t width) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* gate = projected + row * 2 * width;
    const scalar_t* linear = gate + width;
    for (int64_t j = 0; j < width; ++j) {
      const opmath_t g = static_cast<opmath_t>(gate[j]);
      hidden[row * width + j] = static_cast<scalar_t>(g / (opmath_t(1) + std::exp(-g)) * linear[j]);
    }
  }
}

template <typename scalar_t>
void swiglu_backward_rows(const scalar_t* grad_hidden, const scalar_t* projected, scalar_t* grad_projected,
                          int64_t rows, int64_t width) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* gate = projected + row * 2 * width;
    const scalar_t* linear = gate + width;
    scalar_t* grad_gate = grad_projected + row * 2 * width;
    scalar_t* grad_linear = grad_gate + width;
    for (int64_t j = 0; j < width; ++j) {
      const opmath_t g = static_cast<opmath_t>(gate[j]);
      const opmath_t grad = static_cast<opmath_t>(grad_hidden[row * width + j]);
      const opmath_t s = opmath_t(1) / (opmath_t(1) + std::exp(-g));
      grad_gate[j] = static_cast<scalar_t>(grad * static_cast<opmath_t>(linear[j]) *
                                           (s * (opmath_t(1) + g * (opmath_t(1) - s))));
      grad_linear[j] = static_cast<scalar_t>(grad * (g * s));
    }
  }
}

// float32 takes the vectorized loops above (a non-template overload wins over the template).
void swiglu_rows(const float* projected, float* hidden, int64_t rows, int64_t width) {
  swiglu_rows_float(projected, hidden, rows, width);
}

void swiglu_backward_rows(const float* grad_hidden, const float* projected, float* grad_projected, int64_t rows,
                          int64_t width) {
  swiglu_backward_rows_float(grad_hidden, projected, grad_projected, rows, width);
}

void check_projected(const at::Tensor& projected, const char* op) {
  TORCH_CHECK(projected.device().is_cpu(), op, ": expected a CPU tensor, got ", projected.device());
  TORCH_CHECK(projected.dim() == 2 && projected.size(1) % 2 == 0, op, ": projected has shape ",
              projected.sizes(), "; expected [R, 2F]");
  TORCH_CHECK(at::isFloatingType(projected.scalar_type()), op, ": expected a floating-point tensor, got ",
              projected.scalar_type());
}

int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, width));
}

at::Tensor swiglu_cpu(const at::Tensor& projected_in) {
  check_projected(projected_in, "swiglu");
  const at::Tensor projected = projected_in.contiguous();
  const int64_t rows = projected.size(0);
  const int64_t width = projected.size(1) / 2;
  at::Tensor hidden = at::empty({rows, width}, projected.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, projected.scalar_type(), "swiglu", [&] {
    const scalar_t* in = projected.const_data_ptr<scalar_t>();
    scalar_t* out = hidden.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      swiglu_rows(in + begin * 2 * width, out + begin * width, end - begin, width);
    });
  });
  return hidden;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_hidden_in, const at::Tensor& projected_in) {
  check_projected(projected_in, "swiglu_backward");
  const at::Tensor projected = projected_in.contiguous();
  const int64_t rows = projected.size(0);
  const int64_t width = projected.size(1) / 2;
  TORCH_CHECK(grad_hidden_in.dim() == 2 && grad_hidden_in.size(0) == rows && grad_hidden_in.size(1) == width,
              "swiglu_backward: grad_hidden has shape ", grad_hidden_in.sizes(), "; expected [", rows, ", ", width,
              "]");
  TORCH_CHECK(grad_hidden_in.scalar_type() == projected.scalar_type() && grad_hidden_in.device().is_cpu(),
              "swiglu_backward: grad_hidden is ", grad_hidden_in.scalar_type(), " on ", grad_hidden_in.device(),
              "; expected ", projected.scalar_type(), " on cpu");
  const at::Tensor grad_hidden = grad_hidden_in.contiguous();
  at::Tensor grad_projected = at::empty({rows, 2 * width}, projected.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, projected.scalar_type(), "swiglu_backward", [&] {
    const scalar_t* grad = grad_hidden.const_data_ptr<scalar_t>();
    const scalar_t* in = projected.const_data_ptr<scalar_t>();
    scalar_t* out = grad_projected.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      swiglu_backward_rows(grad + begin * width, in + begin * 2 * width, out + begin * 2 * width, end - begin,
                           width);
    });
  });
  return grad_projected;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inhibmoe_fast, m) {
  m.def("swiglu(Tensor projected) -> Tensor");
  m.def("swiglu_backward(Tensor grad_hidden, Tensor projected) -> Tensor");
}

TORCH_LIBRARY_IMPL(inhibmoe_fast, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace inhibmoe_fast
