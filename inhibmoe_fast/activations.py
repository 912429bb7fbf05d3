"""SwiGLU on a fused up projection, with a backward that writes one gradient buffer.

The experts compute the gate and linear branches as one ``[R, 2F]`` matrix
``a``: ``swiglu(a) = silu(a[:, :F]) * a[:, F:]``. Slicing ``a`` under autograd
would build two zero-filled ``[R, 2F]`` gradients and add them; here the
backward writes both halves of one buffer in place. A backward that builds a
graph (``create_graph=True``) uses plain differentiable operations instead.

On the CPU the operators ``inhibmoe_fast::swiglu`` and ``swiglu_backward`` of
the compiled extension compute each pass in one sweep over the rows. Without
the extension, and on other devices, PyTorch operations compute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cpu_operators, settings


def _use_cpu_operators(projected: torch.Tensor) -> bool:
    return (_cpu_operators.AVAILABLE and settings.cpu_operators_enabled() and projected.device.type == "cpu"
            and projected.dim() == 2)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected):
        ctx.save_for_backward(projected)
        if _use_cpu_operators(projected):
            return torch.ops.inhibmoe_fast.swiglu(projected)
        gate, up = projected.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_hidden):
        (projected,) = ctx.saved_tensors
        gate, up = projected.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            # create_graph=True: differentiable operations, since out= writes are not recorded.
            sigmoid_gate = torch.sigmoid(gate)
            grad_gate = grad_hidden * up * sigmoid_gate * (1 + gate * (1 - sigmoid_gate))
            return torch.cat([grad_gate, grad_hidden * gate * sigmoid_gate], dim=-1)
        if _use_cpu_operators(projected):
            return torch.ops.inhibmoe_fast.swiglu_backward(grad_hidden, projected)
        grad = torch.empty_like(projected)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_hidden, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_hidden * up, gate, grad_input=grad_gate)
        return grad


def swiglu(projected: torch.Tensor) -> torch.Tensor:
    """Return ``silu(gate) * up`` for ``projected = [gate, up]`` split along the last dimension."""
    return _SwiGLU.apply(projected)
