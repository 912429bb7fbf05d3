"""Grouped linear map over rows sorted by expert, forward and backward.

``grouped_linear(x, weight, ends)`` computes ``x[rows of g] @ weight[g].T`` for
every group ``g``, where the rows of group ``g`` are ``ends[g-1]:ends[g]``.
The weight gradient of each group is written straight into its slice of one
``[G, out, in]`` tensor, so the backward never builds a full-size gradient per
group.

On the CPU, with at least ``MIN_GROUPS_PER_THREAD`` groups per thread, the
operators ``inhibmoe_fast::grouped_mm_rows`` and ``grouped_mm_weight_grad`` of
the compiled extension run each group's product on one thread, all threads at
once. Otherwise, where ``torch.nn.functional.grouped_mm`` accepts the inputs
(float32, bfloat16 or float16 on the CPU, bfloat16 on Hopper and Blackwell
GPUs, rows 16-byte aligned), it runs every group in one call, forward and
backward. Other inputs (float64, odd widths) go through a loop over the
non-empty groups that calls ``torch.mm`` with ``out=`` slices.

Eager calls run an ``autograd.Function`` that reuses the host copy of ``ends``
in the backward. With ``create_graph=True`` the backward runs through
differentiable functions (the weight gradient has its own), so second
derivatives work. Under ``torch.compile`` the same kernels run as the custom
operators ``inhibmoe_fast::grouped_linear`` and
``inhibmoe_fast::grouped_linear_weight_grad``, which the compiler does not
trace into: its shape function of ``grouped_mm`` rejects float32 inputs
(PyTorch 2.14.1 accepts only bfloat16 and float16 there), and the loop reads
the group ends on the host. Their fake kernels give the compiler the output
shapes.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from . import _cpu_operators, settings

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The CPU operators keep one group per thread. With fewer groups than this per thread some
# threads would idle, and the multithreaded products of grouped_mm or mm are used instead.
MIN_GROUPS_PER_THREAD = 2


def _use_cpu_operators(x: torch.Tensor, groups: int) -> bool:
    """Return whether the extension's one-group-per-thread CPU operators take rows ``x`` in ``groups`` groups."""
    return (_cpu_operators.AVAILABLE and settings.cpu_operators_enabled() and x.device.type == "cpu"
            and x.is_floating_point() and groups >= MIN_GROUPS_PER_THREAD * torch.get_num_threads())


def _use_grouped_mm(x: torch.Tensor, *widths: int) -> bool:
    """Return whether ``F.grouped_mm`` accepts rows ``x`` for a weight with these output and input widths.

    On CUDA only bfloat16 on compute capability 9.x and 10.x qualifies: there
    PyTorch runs its CUTLASS grouped kernels, while other GPUs and dtypes fall
    back to a loop that copies the offsets to the host.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        # The condition of the fast path in PyTorch's _grouped_mm_cuda (aten/src/ATen/native/cuda/GroupedBlas.cpp).
        # NOTE: this branch has not run on a GPU yet.
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
            return False
    elif x.device.type != "cpu" or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    size = x.element_size()
    return all((width * size) % 16 == 0 for width in widths)


def _group_bounds(ends: List[int]):
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            yield g, start, end
        start = end


def _row_or_column_major(weight: torch.Tensor) -> bool:
    """Return whether every ``weight[g]`` is a row- or column-major matrix, as grouped_mm needs.

    The gradient of a sum or of an expand has zero strides, which it does not take.
    """
    groups, rows, cols = weight.stride()
    if weight.shape[0] > 1 and groups == 0:
        return False
    return (cols == 1 and rows >= max(1, weight.shape[2])) or (rows == 1 and cols >= max(1, weight.shape[1]))


def _grouped_forward(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, ends: Optional[List[int]]):
    """Compute ``x[rows of g] @ weight[g].T`` for every group.

    ``ends`` is ``offsets`` as a host list, or ``None`` to read it only when the loop needs it.
    """
    x = x.contiguous()
    if _use_cpu_operators(x, weight.shape[0]):
        return torch.ops.inhibmoe_fast.grouped_mm_rows(x, weight, offsets.tolist() if ends is None else ends)
    if _use_grouped_mm(x, weight.shape[1], weight.shape[2]):
        if not _row_or_column_major(weight):
            weight = weight.contiguous()
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if ends is None:
        ends = offsets.tolist()
    y = x.new_empty(x.shape[0], weight.shape[1])
    for g, start, end in _group_bounds(ends):
        torch.mm(x[start:end], weight[g].t(), out=y[start:end])
    return y


def _grouped_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, ends: Optional[List[int]]):
    """Compute ``grad_y[rows of g].T @ x[rows of g]`` for every group; return ``[G, out, in]``."""
    grad_y, x = grad_y.contiguous(), x.contiguous()
    if _use_cpu_operators(x, offsets.shape[0]):
        return torch.ops.inhibmoe_fast.grouped_mm_weight_grad(grad_y, x, offsets.tolist() if ends is None else ends)
    if _use_grouped_mm(x, grad_y.shape[1], x.shape[1]):
        return F.grouped_mm(grad_y.t(), x, offs=offsets)
    if ends is None:
        ends = offsets.tolist()
    # Zeros, because the loop skips empty groups.
    grad_w = x.new_zeros(offsets.shape[0], grad_y.shape[1], x.shape[1])
    for g, start, end in _group_bounds(ends):
        torch.mm(grad_y[start:end].t(), x[start:end], out=grad_w[g])
    return grad_w


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, ends, offsets):
        ctx.save_for_backward(x, weight)
        ctx.ends, ctx.offsets = ends, offsets
        return _grouped_forward(x, weight, offsets, ends)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = None
        # A backward that builds a graph (create_graph=True) runs through the differentiable
        # Functions; the plain one calls the kernels, whose out= writes autograd cannot record.
        differentiable = torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            # grad_y @ weight[g] is the forward map with each weight transposed.
            if differentiable:
                grad_x = _GroupedLinear.apply(grad_y, weight.transpose(1, 2), ctx.ends, ctx.offsets)
            else:
                grad_x = _grouped_forward(grad_y, weight.transpose(1, 2), ctx.offsets, ctx.ends)
        if ctx.needs_input_grad[1]:
            if differentiable:
                grad_w = _GroupedWeightGrad.apply(grad_y, x, ctx.ends, ctx.offsets)
            else:
                grad_w = _grouped_weight_grad(grad_y, x, ctx.offsets, ctx.ends)
        return grad_x, grad_w, None, None


class _GroupedWeightGrad(torch.autograd.Function):
    """``grad_y[rows of g].T @ x[rows of g]`` for every group, differentiable for double backward."""

    @staticmethod
    def forward(ctx, grad_y, x, ends, offsets):
        ctx.save_for_backward(grad_y, x)
        ctx.ends, ctx.offsets = ends, offsets
        return _grouped_weight_grad(grad_y, x, offsets, ends)

    @staticmethod
    def backward(ctx, grad_grad_w):
        grad_y, x = ctx.saved_tensors
        grad_grad_y = grad_x = None
        # For one group: d(gy^T x) = dgy^T x + gy^T dx, so gy receives x G^T and x receives gy G.
        if ctx.needs_input_grad[0]:
            grad_grad_y = _GroupedLinear.apply(x, grad_grad_w, ctx.ends, ctx.offsets)
        if ctx.needs_input_grad[1]:
            grad_x = _GroupedLinear.apply(grad_y, grad_grad_w.transpose(1, 2), ctx.ends, ctx.offsets)
        return grad_grad_y, grad_x, None, None


def _check_grouped_args(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"x has shape {tuple(x.shape)}; expected a 2-D tensor [M, in]")
    torch._check(weight.dim() == 3, lambda: f"weight has shape {tuple(weight.shape)}; expected [G, out, in]")
    torch._check(
        x.shape[1] == weight.shape[2],
        lambda: f"x has {x.shape[1]} columns but weight has in={weight.shape[2]}; they must be equal",
    )
    torch._check(
        offsets.dim() == 1 and offsets.shape[0] == weight.shape[0],
        lambda: f"offsets has shape {tuple(offsets.shape)}; expected [{weight.shape[0]}] (one end per group)",
    )
    torch._check(offsets.dtype == torch.int32, lambda: f"offsets has dtype {offsets.dtype}; expected torch.int32")
    torch._check(x.dtype == weight.dtype, lambda: f"x has dtype {x.dtype} but weight has {weight.dtype}")


@torch.library.custom_op("inhibmoe_fast::grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply ``weight[g] [out, in]`` to the rows ``offsets[g-1]:offsets[g]`` of ``x [M, in]`` and return ``[M, out]``.

    ``offsets`` is int32 ``[G]``, non-decreasing, with ``offsets[-1] == M``.
    """
    _check_grouped_args(x, weight, offsets)
    return _grouped_forward(x, weight, offsets, None)


@grouped_linear_op.register_fake
def _grouped_linear_fake(x, weight, offsets):
    _check_grouped_args(x, weight, offsets)
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("inhibmoe_fast::grouped_linear_weight_grad", mutates_args=())
def grouped_linear_weight_grad_op(grad_y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Return the weight gradient ``[G, out, in]`` of :func:`grouped_linear_op` for the output gradient ``grad_y``."""
    return _grouped_weight_grad(grad_y, x, offsets, None)


@grouped_linear_weight_grad_op.register_fake
def _grouped_linear_weight_grad_fake(grad_y, x, offsets):
    torch._check(
        grad_y.dim() == 2 and x.dim() == 2 and grad_y.shape[0] == x.shape[0],
        lambda: f"grad_y has shape {tuple(grad_y.shape)} and x {tuple(x.shape)}; expected [M, out] and [M, in]",
    )
    return x.new_empty(offsets.shape[0], grad_y.shape[1], x.shape[1])


def _grouped_linear_setup(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _grouped_linear_backward(ctx, grad_y):
    x, weight, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_linear_op(grad_y, weight.transpose(1, 2), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_linear_weight_grad_op(grad_y, x, offsets)
    return grad_x, grad_w, None


grouped_linear_op.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)


def _weight_grad_setup(ctx, inputs, output):
    grad_y, x, offsets = inputs
    ctx.save_for_backward(grad_y, x, offsets)


def _weight_grad_backward(ctx, grad_grad_weight):
    grad_y, x, offsets = ctx.saved_tensors
    grad_grad_y = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_grad_y = grouped_linear_op(x, grad_grad_weight, offsets)
    if ctx.needs_input_grad[1]:
        grad_x = grouped_linear_op(grad_y, grad_grad_weight.transpose(1, 2), offsets)
    return grad_grad_y, grad_x, None


grouped_linear_weight_grad_op.register_autograd(_weight_grad_backward, setup_context=_weight_grad_setup)


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
        if ctx.needs_input_grad[1] and torch.is_grad_enabled():
            # create_graph=True: one differentiable product, since out= writes are not recorded.
            grad_w = torch.bmm(grad_y.transpose(1, 2), x)
        elif ctx.needs_input_grad[1]:
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


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, ends: Optional[List[int]], offsets: torch.Tensor
) -> torch.Tensor:
    """Apply ``weight[g] [out, in]`` to the rows ``ends[g-1]:ends[g]`` of ``x [M, in]``.

    ``offsets`` contains the cumulative row counts (length ``G``, last entry
    ``M``) as an int32 tensor on ``x``'s device, and ``ends`` the same numbers
    as a host list, or ``None`` to read them from ``offsets`` when needed.
    Returns ``[M, out]``.
    """
    if torch.compiler.is_compiling():
        return grouped_linear_op(x, weight, offsets)
    return _GroupedLinear.apply(x, weight, ends, offsets)
