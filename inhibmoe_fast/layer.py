"""The drop-in inhibited MoE module."""

from __future__ import annotations

import functools

import torch

from . import reference, torch_backend, triton_backend
from .parameters import MoEParameters

BACKENDS = ("auto", "torch", "reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Return whether ``import triton`` succeeds (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class InhibitedMoE(MoEParameters):
    """Mixture-of-Experts layer whose router receives inhibited (gated) features.

    Use it in place of a feed-forward or MoE block: it maps ``x [..., D]`` to
    ``[..., D]``. After each call ``self.aux`` contains the routing results and the
    auxiliary losses (:class:`~inhibmoe_fast.outputs.MoEAux`); add
    ``self.aux.loss`` to the training loss to train with them.

    Args:
        dim: model width ``D``.
        hidden_dim: hidden width ``F`` of each expert.
        num_experts: number of experts ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        backend: ``"auto"`` (``"triton"`` for CUDA inputs of float32, bfloat16 or
            float16 when Triton is installed, ``"torch"`` otherwise), ``"torch"``
            (vectorised PyTorch), ``"triton"`` (routing, experts and combine in
            Triton kernels with no host synchronisation; CUDA tensors, or CPU
            tensors with ``TRITON_INTERPRET=1``) or ``"reference"`` (the plain
            loop of :mod:`inhibmoe_fast.reference`).
        device, dtype: where and in which dtype to create the parameters.
        **options: the options of :class:`~inhibmoe_fast.config.MoEConfig`
            (``inhibition``, ``gate_rank``, ``context_dims``, ``score``, ...).

    The parameter names equal those of
    :class:`~inhibmoe_fast.reference.ReferenceMoE`, so a ``state_dict`` moves
    freely between the two.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int = 2, *, backend: str = "auto",
                 device=None, dtype=None, **options):
        super().__init__(dim, hidden_dim, num_experts, top_k, device=device, dtype=dtype, **options)
        self.backend = backend

    @property
    def backend(self) -> str:
        """The requested backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend={value!r} is not supported; expected one of {', '.join(map(repr, BACKENDS))}")
        self._backend = value

    def resolved_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """Return the backend that runs for inputs on ``device`` (and of ``dtype``, when given)."""
        if self._backend != "auto":
            return self._backend
        triton_dtype = dtype in (None, torch.float32, torch.bfloat16, torch.float16)
        if torch.device(device).type == "cuda" and triton_dtype and triton_available():
            return "triton"
        return "torch"

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Run the layer on ``x [..., D]``; ``context`` is one tensor or ``None`` per context source."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        backend = self.resolved_backend(x.device, self.router_weight.dtype)
        implementation = {"reference": reference, "torch": torch_backend, "triton": triton_backend}[backend]
        return self.run(implementation.moe_forward, x, context)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self._backend!r}"
