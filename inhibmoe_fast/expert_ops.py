"""The Triton expert kernels as ``torch.library`` operators, with fake kernels and autograd.

``torch.ops.inhibmoe_fast.triton_experts`` runs the experts and the combine of
:mod:`inhibmoe_fast.kernels.experts` on dispatched pairs;
``triton_experts_backward`` computes its gradients. Registered as operators,
they are opaque to ``torch.compile``, which traces them without a graph break
from their fake kernels (output shapes depend only on input shapes).

:func:`experts` is the differentiable entry point used by the layer.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

def _kernels():
    # Imported on first use so that TRITON_INTERPRET can be set after inhibmoe_fast is imported.
    from .kernels import experts as kernels

    return kernels


def _layout(order, offsets, counts, row_of_pair, top_k, capacity):
    return _kernels().ExpertLayout(order, offsets, counts, row_of_pair, top_k, capacity)


@torch.library.custom_op("inhibmoe_fast::triton_experts", mutates_args=())
def triton_experts(
    x: Tensor, weights: Tensor, up: Tensor, up_bias: Optional[Tensor], down: Tensor, down_bias: Optional[Tensor],
    order: Tensor, offsets: Tensor, counts: Tensor, row_of_pair: Tensor,
    top_k: int, capacity: int, activation: str, autotune: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(y [N, D], pre [N*k, U], hidden [N*k, F], out [N*k, D])``; see ``kernels.experts.experts_forward``.

    Rows of dropped pairs hold zeros in ``pre``, ``hidden`` and ``out``.
    """
    layout = _layout(order, offsets, counts, row_of_pair, top_k, capacity)
    result = _kernels().experts_forward(x, weights, layout, up, up_bias, down, down_bias, activation,
                                     autotune=autotune)
    return tuple(result)


@triton_experts.register_fake
def _triton_experts_fake(x, weights, up, up_bias, down, down_bias, order, offsets, counts, row_of_pair, top_k,
                         capacity, activation, autotune):
    num_pairs = order.shape[0]
    return (x.new_empty(x.shape), x.new_empty(num_pairs, up.shape[1]), x.new_empty(num_pairs, down.shape[2]),
            x.new_empty(num_pairs, x.shape[1]))


@torch.library.custom_op("inhibmoe_fast::triton_experts_backward", mutates_args=())
def triton_experts_backward(
    grad_y: Tensor, x: Tensor, weights: Tensor, up: Tensor, up_bias: Optional[Tensor], down: Tensor,
    down_bias: Optional[Tensor], order: Tensor, offsets: Tensor, counts: Tensor, row_of_pair: Tensor,
    pre: Tensor, hidden: Tensor, out: Tensor, top_k: int, capacity: int, activation: str, autotune: bool,
    needs_grad: List[bool],
) -> List[Tensor]:
    """Compute the gradients of ``y`` with respect to ``x, weights, up, up_bias, down, down_bias``.

    An entry whose ``needs_grad`` flag is False (or whose bias is absent) is an empty tensor.
    """
    kernels = _kernels()
    layout = _layout(order, offsets, counts, row_of_pair, top_k, capacity)
    forward = kernels.ForwardResult(None, pre, hidden, out)
    present = (True, True, True, up_bias is not None, True, down_bias is not None)
    needs = tuple(bool(n) and p for n, p in zip(needs_grad, present))
    grads = kernels.experts_backward(grad_y.contiguous(), x, weights, layout, up, up_bias, down, down_bias,
                                     activation, forward, needs, autotune=autotune)
    return [x.new_empty(0) if grad is None else grad for grad in grads]


@triton_experts_backward.register_fake
def _triton_experts_backward_fake(grad_y, x, weights, up, up_bias, down, down_bias, order, offsets, counts,
                                  row_of_pair, pre, hidden, out, top_k, capacity, activation, autotune, needs_grad):
    inputs = (x, weights, up, up_bias, down, down_bias)
    return [torch.empty_like(t) if flag and t is not None else x.new_empty(0) for flag, t in zip(needs_grad, inputs)]


def _setup_context(ctx, inputs, output):
    (x, weights, up, up_bias, down, down_bias, order, offsets, counts, row_of_pair,
     top_k, capacity, activation, autotune) = inputs
    _, pre, hidden, out = output
    ctx.save_for_backward(x, weights, up, up_bias, down, down_bias, order, offsets, counts, row_of_pair,
                          pre, hidden, out)
    ctx.options = (top_k, capacity, activation, autotune)


def _backward(ctx, grad_y, grad_pre, grad_hidden, grad_out):
    (x, weights, up, up_bias, down, down_bias, order, offsets, counts, row_of_pair,
     pre, hidden, out) = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.inhibmoe_fast.triton_experts_backward(
        grad_y, x, weights, up, up_bias, down, down_bias, order, offsets, counts, row_of_pair, pre, hidden, out,
        *ctx.options, needs,
    )
    result = [grad if need else None for grad, need in zip(grads, needs)]
    return (*result, None, None, None, None, None, None, None, None)


triton_experts.register_autograd(_backward, setup_context=_setup_context)


def _second_order(ctx, *grads):
    raise RuntimeError(
        "second-order gradients of the Triton expert kernels are not supported "
        "(inhibmoe_fast::triton_experts_backward has no derivative)"
    )


triton_experts_backward.register_autograd(_second_order)


def _unit_stride(tensor: Optional[Tensor]) -> Optional[Tensor]:
    if tensor is None or tensor.numel() == 0 or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def experts(x: Tensor, weights: Tensor, layout, up: Tensor, up_bias: Optional[Tensor], down: Tensor,
            down_bias: Optional[Tensor], activation: str, autotune: bool = False) -> Tensor:
    """Differentiable experts and combine on the Triton kernels: return ``y [N, D]`` in the dtype of ``x``.

    ``layout`` is the :class:`~inhibmoe_fast.kernels.experts.ExpertLayout` of the routing;
    ``weights [N, k]`` are float32 combine weights. Gradients reach ``x``,
    ``weights`` and every expert parameter.
    """
    tensors = [_unit_stride(t) for t in (x, weights.contiguous(), up, up_bias, down, down_bias)]
    y, _, _, _ = torch.ops.inhibmoe_fast.triton_experts(
        *tensors, layout.order, layout.offsets, layout.counts, layout.row_of_pair, layout.top_k, layout.capacity,
        activation, autotune,
    )
    return y
