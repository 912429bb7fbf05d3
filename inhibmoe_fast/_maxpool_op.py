"""Python registration of the ``torch.ops.inhibmoe_fast`` maxpool_align operators.

The compiled extension ``inhibmoe_fast._C`` (imported by
:mod:`inhibmoe_fast._extension`) defines the operators and their CPU (and,
when built, CUDA) kernels. This module adds what
``torch.compile`` and autograd need: fake kernels that compute output shapes
without data, and autograd formulas. The backward operators are differentiable
too (their gradient is a gather), so double backward works.

``AVAILABLE`` is False when the extension failed to import; ``IMPORT_ERROR``
is then the exception.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._extension import AVAILABLE, IMPORT_ERROR  # noqa: F401  (IMPORT_ERROR is read by ops)

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def has_cuda_kernels() -> bool:
    """Return True when the extension was built with its CUDA kernels."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("inhibmoe_fast::maxpool_align", "CUDA")


def _check_fake_source(x: torch.Tensor, name: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{name} has shape {tuple(x.shape)}; expected a 2-D tensor [N_in, C]")
    torch._check(
        x.dtype in _SUPPORTED_DTYPES,
        lambda: f"{name} has dtype {x.dtype}; expected a floating dtype (float64, float32, float16 or bfloat16)",
    )
    torch._check(x.shape[0] > 0, lambda: f"{name} has shape {tuple(x.shape)}, i.e. N_in=0 rows")


def _gather_blocks(
    grad_grads: Sequence[Optional[torch.Tensor]], indices: torch.Tensor, widths: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Gather each block's gradient at the forward indices: the derivative of the backward op."""
    blocks = []
    offset = 0
    for grad_grad, width in zip(grad_grads, widths):
        block_indices = indices[:, offset : offset + width]
        if grad_grad is None:
            blocks.append(torch.zeros(block_indices.shape, dtype=dtype, device=indices.device))
        else:
            blocks.append(grad_grad.gather(0, block_indices))
        offset += width
    return torch.cat(blocks, dim=1)


if AVAILABLE:

    @torch.library.register_fake("inhibmoe_fast::maxpool_align")
    def _maxpool_align_fake(x, n_out):
        _check_fake_source(x, "x")
        torch._check(n_out >= 0, lambda: f"n_out={n_out} is invalid; expected n_out >= 0")
        values = x.new_empty((n_out, x.shape[1]))
        return values, x.new_empty((n_out, x.shape[1]), dtype=torch.long)

    @torch.library.register_fake("inhibmoe_fast::maxpool_align_backward")
    def _maxpool_align_backward_fake(grad_values, indices, n_in):
        torch._check(grad_values.dim() == 2, lambda: f"grad_values has shape {tuple(grad_values.shape)}")
        return grad_values.new_empty((n_in, grad_values.shape[1]))

    @torch.library.register_fake("inhibmoe_fast::maxpool_align_multi")
    def _maxpool_align_multi_fake(sources, n_out):
        torch._check(len(sources) > 0, lambda: "sources is empty; expected at least one [N_in, C] tensor")
        for i, x in enumerate(sources):
            _check_fake_source(x, f"sources[{i}]")
        torch._check(n_out >= 0, lambda: f"n_out={n_out} is invalid; expected n_out >= 0")
        width = sum(x.shape[1] for x in sources)
        values = sources[0].new_empty((n_out, width))
        return values, sources[0].new_empty((n_out, width), dtype=torch.long)

    @torch.library.register_fake("inhibmoe_fast::maxpool_align_multi_backward")
    def _maxpool_align_multi_backward_fake(grad_values, indices, n_in, widths):
        torch._check(len(n_in) == len(widths), lambda: f"n_in has {len(n_in)} entries, widths {len(widths)}")
        return [grad_values.new_empty((rows, width)) for rows, width in zip(n_in, widths)]

    # Autograd of the forward operators: the gradient goes to the rows named by the indices.

    def _setup_single(ctx, inputs, output):
        x, _ = inputs
        ctx.n_in = x.shape[0]
        ctx.save_for_backward(output[1])

    def _backward_single(ctx, grad_values, grad_indices):
        (indices,) = ctx.saved_tensors
        return torch.ops.inhibmoe_fast.maxpool_align_backward(grad_values, indices, ctx.n_in), None

    torch.library.register_autograd(
        "inhibmoe_fast::maxpool_align", _backward_single, setup_context=_setup_single
    )

    def _setup_multi(ctx, inputs, output):
        sources, _ = inputs
        ctx.n_in = [x.shape[0] for x in sources]
        ctx.widths = [x.shape[1] for x in sources]
        ctx.save_for_backward(output[1])

    def _backward_multi(ctx, grad_values, grad_indices):
        (indices,) = ctx.saved_tensors
        grads = torch.ops.inhibmoe_fast.maxpool_align_multi_backward(grad_values, indices, ctx.n_in, ctx.widths)
        return list(grads), None

    torch.library.register_autograd(
        "inhibmoe_fast::maxpool_align_multi", _backward_multi, setup_context=_setup_multi
    )

    # Autograd of the backward operators (double backward): they are linear in
    # grad_values, and their derivative gathers the incoming gradient at the indices.

    def _setup_backward_single(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _backward_backward_single(ctx, grad_grad_x):
        (indices,) = ctx.saved_tensors
        return grad_grad_x.gather(0, indices), None, None

    torch.library.register_autograd(
        "inhibmoe_fast::maxpool_align_backward", _backward_backward_single, setup_context=_setup_backward_single
    )

    def _setup_backward_multi(ctx, inputs, output):
        ctx.widths = list(inputs[3])
        ctx.dtype = inputs[0].dtype
        ctx.save_for_backward(inputs[1])

    def _backward_backward_multi(ctx, grad_grads: List[Optional[torch.Tensor]]):
        (indices,) = ctx.saved_tensors
        return _gather_blocks(grad_grads, indices, ctx.widths, ctx.dtype), None, None, None

    torch.library.register_autograd(
        "inhibmoe_fast::maxpool_align_multi_backward", _backward_backward_multi, setup_context=_setup_backward_multi
    )
