"""Fake kernels and autograd formulas of the extension's CPU operators.

The compiled extension defines ``inhibmoe_fast::grouped_mm_rows``,
``grouped_mm_weight_grad``, ``swiglu`` and ``swiglu_backward`` with CPU kernels
only. This module adds fake kernels, which give ``torch.compile`` and meta
tensors the output shapes, and autograd formulas, so that a direct call of an
operator is differentiable. The grouped products differentiate to each other,
to any order. ``swiglu_backward`` has no derivative: a second-order gradient
through ``swiglu`` raises, and ``inhibmoe_fast.activations.swiglu`` is the
function to use for one.

``AVAILABLE`` is False when the extension failed to import.
"""

from __future__ import annotations

import torch

from ._extension import AVAILABLE

ops = torch.ops.inhibmoe_fast


def _grouped_rows_setup(ctx, inputs, output):
    x, weight, ends = inputs
    ctx.save_for_backward(x, weight)
    ctx.ends = ends


def _grouped_rows_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.grouped_mm_rows(grad, weight.transpose(1, 2), ctx.ends)
    if ctx.needs_input_grad[1]:
        grad_weight = ops.grouped_mm_weight_grad(grad, x, ctx.ends)
    return grad_x, grad_weight, None


def _weight_grad_setup(ctx, inputs, output):
    grad_y, x, ends = inputs
    ctx.save_for_backward(grad_y, x)
    ctx.ends = ends


def _weight_grad_backward(ctx, grad):
    # For one group, d(gy^T x) = dgy^T x + gy^T dx, so gy receives x G^T and x receives gy G.
    grad_y, x = ctx.saved_tensors
    grad_grad_y = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_grad_y = ops.grouped_mm_rows(x, grad, ctx.ends)
    if ctx.needs_input_grad[1]:
        grad_x = ops.grouped_mm_rows(grad_y, grad.transpose(1, 2), ctx.ends)
    return grad_grad_y, grad_x, None


def _swiglu_setup(ctx, inputs, output):
    (projected,) = inputs
    ctx.save_for_backward(projected)


def _swiglu_backward(ctx, grad_hidden):
    (projected,) = ctx.saved_tensors
    return ops.swiglu_backward(grad_hidden, projected)


def _swiglu_second_order(ctx, grad):
    raise RuntimeError(
        "inhibmoe_fast::swiglu_backward has no derivative, so second-order gradients of the swiglu operator "
        "are not supported; inhibmoe_fast.activations.swiglu supports them"
    )


if AVAILABLE:

    @torch.library.register_fake("inhibmoe_fast::grouped_mm_rows")
    def _grouped_rows_fake(x, weight, ends):
        torch._check(x.dim() == 2 and weight.dim() == 3, lambda: "expected x [M, in] and weight [G, out, in]")
        return x.new_empty(x.shape[0], weight.shape[1])

    @torch.library.register_fake("inhibmoe_fast::grouped_mm_weight_grad")
    def _weight_grad_fake(grad_y, x, ends):
        torch._check(grad_y.dim() == 2 and x.dim() == 2, lambda: "expected grad_y [M, out] and x [M, in]")
        return x.new_empty(len(ends), grad_y.shape[1], x.shape[1])

    @torch.library.register_fake("inhibmoe_fast::swiglu")
    def _swiglu_fake(projected):
        torch._check(projected.dim() == 2, lambda: f"projected has shape {tuple(projected.shape)}; expected [R, 2F]")
        return projected.new_empty(projected.shape[0], projected.shape[1] // 2)

    @torch.library.register_fake("inhibmoe_fast::swiglu_backward")
    def _swiglu_backward_fake(grad_hidden, projected):
        return projected.new_empty(projected.shape)

    torch.library.register_autograd("inhibmoe_fast::grouped_mm_rows", _grouped_rows_backward,
                                    setup_context=_grouped_rows_setup)
    torch.library.register_autograd("inhibmoe_fast::grouped_mm_weight_grad", _weight_grad_backward,
                                    setup_context=_weight_grad_setup)
    torch.library.register_autograd("inhibmoe_fast::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
    torch.library.register_autograd("inhibmoe_fast::swiglu_backward", _swiglu_second_order)
