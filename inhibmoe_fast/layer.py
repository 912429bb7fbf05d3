"""The drop-in inhibited MoE module."""

from __future__ import annotations

import torch

from . import reference, torch_backend
from .parameters import MoEParameters

BACKENDS = ("auto", "torch", "reference")


class InhibitedMoE(MoEParameters):
    """Mixture-of-Experts layer whose router receives inhibited (gated) features.

    Use it in place of a feed-forward or MoE block: it maps ``x [..., D]`` to
    ``[..., D]``. After each call ``self.aux`` holds the routing results and the
    auxiliary losses (:class:`~inhibmoe_fast.outputs.MoEAux`); add
    ``self.aux.loss`` to the training loss to train with them.

    Args:
        dim: model width ``D``.
        hidden_dim: hidden width ``F`` of each expert.
        num_experts: number of experts ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        backend: ``"auto"`` (the fastest available for the input's device),
            ``"torch"`` (vectorised PyTorch) or ``"reference"`` (the plain loop
            of :mod:`inhibmoe_fast.reference`).
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
        """The requested backend: ``"auto"``, ``"torch"`` or ``"reference"``."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend={value!r} is not supported; expected one of {', '.join(map(repr, BACKENDS))}")
        self._backend = value

    def resolved_backend(self, device: torch.device) -> str:
        """Return the backend that runs for inputs on ``device``."""
        return "torch" if self._backend == "auto" else self._backend

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Run the layer on ``x [..., D]``; ``context`` is one tensor or ``None`` per context source."""
        tokens, sources = self.check_input(x, context)
        implementation = reference if self.resolved_backend(x.device) == "reference" else torch_backend
        y, self.aux = implementation.moe_forward(self, tokens, sources)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self._backend!r}"
