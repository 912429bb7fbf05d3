"""Pieces shared by the Triton kernels: the float32-accumulating dot product and input checks.

``INTERPRETED`` is True when the kernels were defined by the Triton interpreter,
because ``TRITON_INTERPRET=1`` was set before this module was first imported.
The kernels then run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Return ``acc + a @ b`` with float32 accumulation.

    ``UPCAST_DOT`` multiplies in float32, which is exact for 16-bit operands up
    to the summation order.
    NOTE: the interpreter needs ``UPCAST_DOT`` because its ``tl.dot`` returns
    wrong values for bfloat16 operands (seen with Triton 3.8.0).
    """
    if UPCAST_DOT:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        result = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return result


@triton.jit
def cast_to(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Return ``x`` converted to ``dtype``, rounding to nearest even.

    NOTE: the interpreter truncates float32 to bfloat16 (seen with Triton 3.8.0,
    ``fp_downcast_rounding="rtne"`` included), which biases every rounded value
    towards zero. ``ROUND_BF16`` rounds the float32 bits first, so the
    truncation that follows is exact; GPUs round correctly without it.
    """
    if ROUND_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        # NaN keeps its own bits: the carry could turn it into an infinity.
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(dtype)


INTERPRETED = not isinstance(dot, triton.runtime.JITFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """Return the ``input_precision`` of ``tl.dot`` for operands of ``dtype``.

    "ieee" keeps float32 products exact on GPUs (no tf32), so the interpreter
    and the GPU compute the same function. The setting only affects float32 operands.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Raise ``RuntimeError`` for a CPU tensor while the interpreter is off."""
    if tensor.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{name} is on the CPU, but the Triton kernels run on CUDA devices only; move the tensors to a GPU, "
            "or set TRITON_INTERPRET=1 before inhibmoe_fast.kernels is imported to run them through the Triton "
            "interpreter"
        )


def check_tensor(name: str, tensor, shape, dtype: torch.dtype, device: torch.device) -> None:
    """Check one input: a tensor of ``shape`` (``None`` entries match any size), ``dtype``, ``device``, unit stride."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected [{expected}]")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected {dtype} (the dtype of x)")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}; expected {device} (the device of x)")
    if tensor.numel() > 0 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} has strides {tuple(tensor.stride())}; the last dimension must have stride 1 "
            f"(call .contiguous() on it)"
        )
