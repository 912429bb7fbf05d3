"""Options of the inhibited MoE layer and their validation.

Every layer (reference and fast) is built from one :class:`MoEConfig`, so the
rules for valid options live in one place and every error names the argument,
the value it got and what is expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Tuple

INHIBITIONS = ("none", "dropout", "local", "global")
SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu", "relu")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; expected True or False")


def _capacity_ratio(factor: float) -> Tuple[int, int]:
    """Return ``factor`` as (numerator, denominator) of the nearest fraction with denominator <= 10**6.

    Small terms keep ``numerator * N * k`` inside int64 when torch.compile turns the capacity
    into a symbolic expression, whereas the shortest decimal form of 4/3 has 17 digits. A factor
    that would round to 0 keeps its shortest decimal form instead, whose terms are small.
    """
    exact = Fraction(repr(factor))
    near = exact.limit_denominator(10**6)
    ratio = near if near > 0 else exact
    return ratio.numerator, ratio.denominator


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and options of an inhibited MoE layer.

    Attributes:
        dim: model width ``D`` (last dimension of the input and the output).
        hidden_dim: hidden width ``F`` of each expert MLP.
        num_experts: number of experts ``E``.
        top_k: experts chosen per token, ``1 <= top_k <= num_experts``.
        inhibition: ``"none"``, ``"dropout"``, ``"local"`` or ``"global"``.
        gate_rank: rank ``r`` of the low-rank inhibition gate ``W_g = U V``; ``None`` for a full ``D x D`` gate.
        context_dims: feature widths of the context sources of global inhibition.
        dropout_p: drop probability of the ``"dropout"`` inhibition (default 0.75); only for that inhibition.
        score: ``"softmax"`` or ``"sigmoid"`` router scores.
        renormalize: divide the selected scores by their sum.
        capacity_factor: keep at most ``ceil(c * N * k / E)`` (token, slot) pairs per expert; ``None`` drops nothing.
            The product is computed exactly with ``c`` as the nearest fraction whose denominator
            is at most 10**6, so ``c=1.1, N=90, k=1, E=3`` gives 33 and ``c=4/3`` is exactly 4/3.
        activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        expert_bias: give the expert projections biases.
        router_bias: give the router a bias.
        inhibit_experts: feed the experts the gated input ``u`` instead of ``x``.
        load_balance_coef: weight of the load-balancing loss in ``aux.loss``.
        z_loss_coef: weight of the router z-loss in ``aux.loss``.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    inhibition: str = "local"
    gate_rank: int | None = None
    context_dims: Tuple[int, ...] = field(default_factory=tuple)
    dropout_p: float | None = None
    score: str = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    activation: str = "swiglu"
    expert_bias: bool = False
    router_bias: bool = True
    inhibit_experts: bool = False
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        _check_positive_int("dim", self.dim)
        _check_positive_int("hidden_dim", self.hidden_dim)
        _check_positive_int("num_experts", self.num_experts)

        if not _is_int(self.top_k):
            raise ValueError(f"top_k={self.top_k!r} is invalid; expected an integer")
        for name in ("dim", "hidden_dim", "num_experts", "top_k"):
            object.__setattr__(self, name, int(getattr(self, name)))  # NumPy integers become plain ints
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} is out of range for num_experts={self.num_experts}; "
                f"expected 1 <= top_k <= num_experts"
            )

        _check_choice("inhibition", self.inhibition, INHIBITIONS)
        _check_choice("score", self.score, SCORES)
        _check_choice("activation", self.activation, ACTIVATIONS)

        if self.gate_rank is not None:
            _check_positive_int("gate_rank", self.gate_rank)
            object.__setattr__(self, "gate_rank", int(self.gate_rank))
            if self.inhibition not in ("local", "global"):
                raise ValueError(
                    f"gate_rank={self.gate_rank} needs inhibition='local' or 'global', got inhibition={self.inhibition!r}"
                )
        if not isinstance(self.context_dims, (tuple, list)):
            raise ValueError(f"context_dims={self.context_dims!r} is invalid; expected a tuple of widths, such as (256,)")
        dims = tuple(self.context_dims)
        for i, width in enumerate(dims):
            _check_positive_int(f"context_dims[{i}]", width)
        dims = tuple(int(width) for width in dims)
        object.__setattr__(self, "context_dims", dims)
        if dims and self.inhibition != "global":
            raise ValueError(f"context_dims={dims} needs inhibition='global', got inhibition={self.inhibition!r}")

        if self.dropout_p is None:
            object.__setattr__(self, "dropout_p", 0.75 if self.inhibition == "dropout" else None)
        elif self.inhibition != "dropout":
            raise ValueError(f"dropout_p={self.dropout_p!r} needs inhibition='dropout', got inhibition={self.inhibition!r}")
        elif not (_is_real(self.dropout_p) and 0.0 <= self.dropout_p < 1.0):
            raise ValueError(f"dropout_p={self.dropout_p!r} is invalid; expected 0 <= dropout_p < 1")
        else:
            object.__setattr__(self, "dropout_p", float(self.dropout_p))

        for name in ("renormalize", "expert_bias", "router_bias", "inhibit_experts"):
            _check_bool(name, getattr(self, name))
        if self.capacity_factor is not None:
            c = self.capacity_factor
            if not _is_real(c) or not math.isfinite(c) or c <= 0:
                raise ValueError(f"capacity_factor={c!r} is invalid; expected a finite number > 0 or None")
            object.__setattr__(self, "capacity_factor", float(c))
            object.__setattr__(self, "_capacity_ratio", _capacity_ratio(float(c)))
        for name in ("load_balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid; expected a finite number >= 0")
            object.__setattr__(self, name, float(value))

    @property
    def has_gate(self) -> bool:
        """Whether the layer has a learned inhibition gate."""
        return self.inhibition in ("local", "global")

    def __setstate__(self, state: dict) -> None:
        # Configs pickled by earlier versions of the package lack the cached ratio.
        self.__dict__.update(state)
        if state.get("capacity_factor") is not None and "_capacity_ratio" not in state:
            object.__setattr__(self, "_capacity_ratio", _capacity_ratio(state["capacity_factor"]))

    def capacity(self, num_tokens: int) -> int | None:
        """Return the maximum number of (token, slot) pairs per expert for ``num_tokens`` tokens."""
        if self.capacity_factor is None:
            return None
        # Integer arithmetic on the exact fraction: float products round up or down by one
        # near whole numbers (1.1 * 90 / 3 is 33.000000000000004 in binary).
        # It also keeps a symbolic num_tokens symbolic under torch.compile.
        numerator, denominator = self._capacity_ratio
        if numerator * self.top_k >= denominator * self.num_experts:
            # c * k / E >= 1: an expert can hold every token, so none is dropped. Returning N
            # keeps the buffers small and the integers below int64 for a huge factor.
            return num_tokens
        return -(-numerator * num_tokens * self.top_k // (denominator * self.num_experts))
