"""Fused routing of the inhibited MoE layer on the Triton kernels (the ``"triton"`` backend).

:func:`route` runs inhibition gate, router logits, scores, top-k, weights and
dispatch metadata in the fused kernels of :mod:`inhibmoe_fast.kernels.routing`
and is differentiable with respect to every floating input. The kernels are
registered as the operators ``torch.ops.inhibmoe_fast.triton_route`` and
``triton_route_backward``, with fake kernels, so ``torch.compile`` traces
them without a graph break.

Only the logits ``[N, E]``, ids and weights ``[N, k]`` are saved for the
backward (besides the inputs, and the context when one is given): the
backward recomputes the gate from ``x``.

The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` set before the first
import of :mod:`inhibmoe_fast.kernels.routing` to run on CPU tensors through
the Triton interpreter.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

SCORES = ("softmax", "sigmoid")


def _kernels():
    # Imported on first use so that TRITON_INTERPRET can be set after inhibmoe_fast is imported.
    from .kernels import routing as kernels

    return kernels


class RouteResult(NamedTuple):
    """Outputs of :func:`route` for ``N`` tokens, ``E`` experts and ``k`` experts per token.

    Attributes:
        logits: router logits ``[N, E]``, float32.
        ids: chosen experts ``[N, k]``, int64, best score first, ties to the lower index.
        weights: combine weights ``[N, k]``, float32.
        counts: (token, slot) pairs per expert ``[E]``, int64.
        offsets: ``[E + 1]`` int64 start of each expert in ``order``; ``None`` when ``dispatch=False``.
        order: ``[N * k]`` int64 pair numbers ``t * k + j`` grouped by expert and in token
            order inside each expert (token ``order // k``); ``None`` when ``dispatch=False``.
    """

    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    offsets: Optional[torch.Tensor]
    order: Optional[torch.Tensor]


_INPUT_NAMES = ("x", "router_weight", "router_bias", "gate_weight", "gate_u", "gate_v", "gate_bias", "context",
                "context_weight")


@torch.library.custom_op("inhibmoe_fast::triton_route", mutates_args=())
def triton_route(
    x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor], gate_weight: Optional[Tensor],
    gate_u: Optional[Tensor], gate_v: Optional[Tensor], gate_bias: Optional[Tensor], context: Optional[Tensor],
    context_weight: Optional[Tensor], top_k: int, softmax: bool, renormalize: bool, dispatch: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the fused routing kernels; return ``(logits, ids, weights, counts, offsets, order)``.

    ``offsets`` and ``order`` are empty when ``dispatch`` is False. The inputs
    are checked by :func:`route`.
    """
    kernels = _kernels()
    result = kernels.route_forward(
        x, router_weight, router_bias, top_k=top_k, softmax=softmax, renormalize=renormalize,
        gate_weight=gate_weight, gate_u=gate_u, gate_v=gate_v, gate_bias=gate_bias,
        context=context, context_weight=context_weight,
    )
    if dispatch:
        counts, offsets, order = kernels.dispatch_metadata(result.ids, result.tile_counts, result.block_m)
    else:
        counts = result.tile_counts.sum(dim=0, dtype=torch.int64)
        offsets = torch.empty(0, dtype=torch.int64, device=x.device)
        order = torch.empty(0, dtype=torch.int64, device=x.device)
    return result.logits, result.ids, result.weights, counts, offsets, order


@triton_route.register_fake
def _triton_route_fake(x, router_weight, router_bias, gate_weight, gate_u, gate_v, gate_bias, context,
                       context_weight, top_k, softmax, renormalize, dispatch):
    num_tokens, num_experts = x.shape[0], router_weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    i64 = dict(dtype=torch.int64, device=x.device)
    offsets = torch.empty(num_experts + 1 if dispatch else 0, **i64)
    order = torch.empty(num_tokens * top_k if dispatch else 0, **i64)
    return (torch.empty(num_tokens, num_experts, **f32), torch.empty(num_tokens, top_k, **i64),
            torch.empty(num_tokens, top_k, **f32), torch.empty(num_experts, **i64), offsets, order)


@torch.library.custom_op("inhibmoe_fast::triton_route_backward", mutates_args=())
def triton_route_backward(
    grad_logits: Optional[Tensor], grad_weights: Optional[Tensor], x: Tensor, router_weight: Tensor,
    router_bias: Optional[Tensor], gate_weight: Optional[Tensor], gate_u: Optional[Tensor], gate_v: Optional[Tensor],
    gate_bias: Optional[Tensor], context: Optional[Tensor], context_weight: Optional[Tensor], logits: Tensor,
    ids: Tensor, softmax: bool, renormalize: bool, needs_grad: List[bool],
) -> List[Tensor]:
    """Gradients of the nine routing inputs from those of ``logits`` and ``weights`` (either may be ``None``).

    An entry whose ``needs_grad`` flag is False, or whose input is absent, is an empty tensor.
    """
    grads = _kernels().route_backward(
        x, router_weight, router_bias, gate_weight, gate_u, gate_v, gate_bias, context, context_weight, logits, ids,
        softmax=softmax, renormalize=renormalize,
        grad_weights=None if grad_weights is None else grad_weights.contiguous(),
        grad_logits=None if grad_logits is None else grad_logits.contiguous(),
        needs_input_grad=tuple(needs_grad),
    )
    return [x.new_empty(0) if grad is None else grad for grad in grads]


@triton_route_backward.register_fake
def _triton_route_backward_fake(grad_logits, grad_weights, x, router_weight, router_bias, gate_weight, gate_u,
                                gate_v, gate_bias, context, context_weight, logits, ids, softmax, renormalize,
                                needs_grad):
    inputs = (x, router_weight, router_bias, gate_weight, gate_u, gate_v, gate_bias, context, context_weight)
    return [torch.empty_like(t) if flag and t is not None else x.new_empty(0) for flag, t in zip(needs_grad, inputs)]


def _setup_route_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9], output[0], output[1])
    ctx.softmax, ctx.renormalize = inputs[10], inputs[11]
    ctx.mark_non_differentiable(output[1], *output[3:])  # ids, counts, offsets, order


def _route_backward(ctx, grad_logits, grad_ids, grad_weights, grad_counts, grad_offsets, grad_order):
    saved = ctx.saved_tensors
    inputs, (logits, ids) = saved[:9], saved[9:]
    needs = [bool(flag) and t is not None for flag, t in zip(ctx.needs_input_grad[:9], inputs)]
    grads = torch.ops.inhibmoe_fast.triton_route_backward(
        grad_logits, grad_weights, *inputs, logits, ids, ctx.softmax, ctx.renormalize, needs,
    )
    return (*(grad if need else None for grad, need in zip(grads, needs)), None, None, None, None)


triton_route.register_autograd(_route_backward, setup_context=_setup_route_context)


def _second_order(ctx, *grads):
    raise RuntimeError(
        "second-order gradients of the Triton routing kernels are not supported "
        "(inhibmoe_fast::triton_route_backward has no derivative)"
    )


triton_route_backward.register_autograd(_second_order)


def _unit_stride(tensor):
    """Return ``tensor`` with stride 1 in its last dimension (a copy only when needed); pass other values through."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor] = None, *, top_k: int,
          score: str = "softmax", renormalize: bool = True, gate_weight: Optional[torch.Tensor] = None,
          gate_u: Optional[torch.Tensor] = None, gate_v: Optional[torch.Tensor] = None,
          gate_bias: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
          context_weight: Optional[torch.Tensor] = None, dispatch: bool = True) -> RouteResult:
    """Route tokens ``x [N, D]`` to their ``top_k`` experts with the fused Triton kernels.

    Computes ``u = x * sigmoid(x W_g^T + b_g + context term)`` (``u = x``
    without a gate), logits ``u W_r^T + b_r`` in float32, softmax or sigmoid
    scores, the ``top_k`` best experts (ties to the lower index, NaN counted as
    the largest score, ids always valid and distinct) and their weights.

    Args:
        x: tokens ``[N, D]``, float32, bfloat16 or float16; every other tensor has this dtype and device.
        router_weight: ``W_r [E, D]``, ``E <= 1024``.
        router_bias: ``b_r [E]`` or ``None``.
        top_k: experts per token, ``1 <= top_k <= E``.
        score: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the chosen scores by their sum.
        gate_weight: full gate ``W_g [D, D]`` (``nn.Linear`` layout).
        gate_u, gate_v: low-rank gate ``W_g = U V`` with ``U [D, r]``, ``V [r, D]``, ``r <= 256``.
        gate_bias: ``b_g [D]``.
        context: without ``context_weight``, a term ``[N, D]`` added to the gate
            pre-activation (kept for the backward); with it, a matrix ``[N, C]``.
        context_weight: ``[D, C]``: the kernel adds ``context @ context_weight^T``.
        dispatch: also compute ``offsets`` and ``order``.

    Returns:
        :class:`RouteResult`. ``logits`` and ``weights`` are differentiable; the
        gradients of the aux losses reach the inputs through ``logits``.

    Raises:
        ValueError, TypeError: invalid ``top_k``, ``score``, shapes, dtypes, devices or gate arguments.
        RuntimeError: CPU tensors while the Triton interpreter is off.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not supported; expected one of {', '.join(map(repr, SCORES))}")
    tensors = [x, router_weight, router_bias, gate_weight, gate_u, gate_v, gate_bias, context, context_weight]
    tensors = [_unit_stride(t) for t in tensors]
    _kernels().check_route_inputs(*tensors[:3], top_k, *tensors[3:])
    logits, ids, weights, counts, offsets, order = torch.ops.inhibmoe_fast.triton_route(
        *tensors, int(top_k), score == "softmax", bool(renormalize), bool(dispatch))
    if not dispatch:
        offsets = order = None
    return RouteResult(logits, ids, weights, counts, offsets, order)
