"""Grouped linear map over rows sorted by expert, forward and backward.

``grouped_linear(x, weight, ends)`` computes ``x[rows of g] @ weight[g].T`` for
every group ``g``, where the rows of group ``g`` are ``ends[g-1]:ends[g]``.
The weight gradient of each group is written straight into its slice of one
``[G, out, in]`` tensor, so the backward never builds a full-size gradient per
group.

Where ``torch.nn.functional.grouped_mm`` accepts the inputs (float32, bfloat16
or float16 on the CPU, rows 16-byte aligned) it runs every group in one call,
forward and backward. Other inputs (float64, odd widths) go through a loop over
the non-empty groups that calls ``torch.mm`` with ``out=`` slices.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.device.type != "cpu" or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    size = x.element_size()
    return (weight.shape[1] * size) % 16 == 0 and (weight.shape[2] * size) % 16 == 0


def _group_bounds(ends: List[int]):
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            yield g, start, end
        start = end


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, ends, offsets):
        ctx.save_for_backward(x, weight)
        ctx.ends, ctx.offsets = ends, offsets
        if _use_grouped_mm(x, weight):
            return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        y = x.new_empty(x.shape[0], weight.shape[1])
        for g, start, end in _group_bounds(ends):
            torch.mm(x[start:end], weight[g].t(), out=y[start:end])
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = None
        if _use_grouped_mm(x, weight):
            if ctx.needs_input_grad[0]:
                grad_x = F.grouped_mm(grad_y, weight, offs=ctx.offsets)
            if ctx.needs_input_grad[1]:
                grad_w = F.grouped_mm(grad_y.t(), x, offs=ctx.offsets)
            return grad_x, grad_w, None, None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_zeros(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = weight.new_zeros(weight.shape)
        for g, start, end in _group_bounds(ctx.ends):
            if grad_x is not None:
                torch.mm(grad_y[start:end], weight[g], out=grad_x[start:end])
            if grad_w is not None:
                torch.mm(grad_y[start:end].t(), x[start:end], out=grad_w[g])
        return grad_x, grad_w, None, None


# Output rows of the weight gradient computed per batched product (see _BatchedLinear.backward).
WEIGHT_GRAD_BLOCK = 256


class _BatchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # grad_y^T x (not x^T grad_y) writes the [E, out, in] gradient in the weight's own
            # layout, so no transposing copy follows. Blocks of at most WEIGHT_GRAD_BLOCK output
            # rows run about twice as fast on the CPU as one wide product when the batch is short.
            grad_w = torch.empty_like(weight)
            for start in range(0, weight.shape[1], WEIGHT_GRAD_BLOCK):
                block = slice(start, start + WEIGHT_GRAD_BLOCK)
                torch.bmm(grad_y[:, :, block].transpose(1, 2), x, out=grad_w[:, block])
        return grad_x, grad_w


def batched_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply ``weight[e] [out, in]`` to ``x[e] [C, in]`` for every expert ``e``; return ``[E, C, out]``."""
    return _BatchedLinear.apply(x, weight)


# torch.compile traces grouped_mm with a shape function that accepts only 16-bit CUDA inputs,
# so compiled callers run this function eagerly (a graph break) instead.
@torch.compiler.disable
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: List[int], offsets: torch.Tensor) -> torch.Tensor:
    """Apply ``weight[g] [out, in]`` to the rows ``ends[g-1]:ends[g]`` of ``x [M, in]``.

    ``ends`` is the list of cumulative row counts (length ``G``, last entry
    ``M``) and ``offsets`` the same numbers as an int32 tensor on ``x``'s device.
    Returns ``[M, out]``.
    """
    return _GroupedLinear.apply(x, weight, ends, offsets)
