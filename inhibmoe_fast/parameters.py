"""Parameters shared by the reference and the fast layer.

Both layers subclass :class:`MoEParameters`, so they have the same parameter
names and shapes and one ``state_dict`` loads into either.

Parameter layout (``D`` model width, ``F`` expert width, ``E`` experts, ``r`` gate rank):

===================== ============== ==========================================
name                  shape          present when
===================== ============== ==========================================
``inhibit_weight``    ``[D, D]``     local or global inhibition, full gate
``inhibit_u``         ``[D, r]``     local or global inhibition, ``gate_rank=r``
``inhibit_v``         ``[r, D]``     local or global inhibition, ``gate_rank=r``
``inhibit_bias``      ``[D]``        local or global inhibition
``context_weights.s`` ``[D, D_s]``   global inhibition, one per context source
``router_weight``     ``[E, D]``     always
``router_bias``       ``[E]``        ``router_bias=True``
``expert_up``         ``[E, U, D]``  always
``expert_down``       ``[E, D, F]``  always
``expert_up_bias``    ``[E, U]``     ``expert_bias=True``
``expert_down_bias``  ``[E, D]``     ``expert_bias=True``
===================== ============== ==========================================

Weights use the ``nn.Linear`` layout ``[out, in]`` per expert. The up
projection has ``U = 2F`` outputs for SwiGLU, the gate projection in rows
``0 .. F-1`` and the linear branch in rows ``F .. 2F-1`` (``silu(gate) * up``),
so both run as one matrix multiply; ``U = F`` for GELU and ReLU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from .config import MoEConfig

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(MoEConfig))


def make_config(dim, hidden_dim, num_experts, top_k, options) -> MoEConfig:
    """Build a :class:`MoEConfig`, rejecting option names it does not define."""
    unknown = sorted(set(options) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}; valid options are {', '.join(_CONFIG_FIELDS[4:])}")
    return MoEConfig(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k, **options)


def _uniform(shape, fan_in, device, dtype) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound))



def _autocast_enabled(device_type: str) -> bool:
    """Return whether autocast is on for ``device_type``, and False for device types autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False

class MoEParameters(nn.Module):
    """Parameters of an inhibited MoE layer, laid out as the module docstring lists."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int = 2, *, device=None, dtype=None, **options):
        super().__init__()
        self.config = make_config(dim, hidden_dim, num_experts, top_k, options)
        cfg = self.config
        D, F, E = cfg.dim, cfg.hidden_dim, cfg.num_experts
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())

        if cfg.has_gate:
            if cfg.gate_rank is None:
                self.inhibit_weight = _uniform((D, D), D, **factory)
            else:
                self.inhibit_u = _uniform((D, cfg.gate_rank), cfg.gate_rank, **factory)
                self.inhibit_v = _uniform((cfg.gate_rank, D), D, **factory)
            self.inhibit_bias = nn.Parameter(torch.zeros(D, **factory))
        if cfg.context_dims:
            self.context_weights = nn.ParameterList([_uniform((D, width), width, **factory) for width in cfg.context_dims])

        self.router_weight = _uniform((E, D), D, **factory)
        self.router_bias = nn.Parameter(torch.zeros(E, **factory)) if cfg.router_bias else None

        up_width = 2 * F if cfg.activation == "swiglu" else F
        self.expert_up = _uniform((E, up_width, D), D, **factory)
        self.expert_down = _uniform((E, D, F), F, **factory)
        if cfg.expert_bias:
            self.expert_up_bias = nn.Parameter(torch.zeros(E, up_width, **factory))
            self.expert_down_bias = nn.Parameter(torch.zeros(E, D, **factory))
        else:
            self.expert_up_bias = self.expert_down_bias = None

        self.aux = None

    def __getstate__(self):
        # ``aux`` references the last call's autograd graph, which cannot be copied or pickled,
        # so copies and pickles start without it.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["aux"] = None
        return state

    @property
    def gate_weight(self) -> torch.Tensor | None:
        """The full inhibition gate matrix ``W_g`` (``U V`` for a low-rank gate), or ``None`` without a gate."""
        if not self.config.has_gate:
            return None
        if self.config.gate_rank is None:
            return self.inhibit_weight
        return self.inhibit_u @ self.inhibit_v

    def extra_repr(self) -> str:
        cfg = self.config
        parts = [f"dim={cfg.dim}", f"hidden_dim={cfg.hidden_dim}", f"num_experts={cfg.num_experts}", f"top_k={cfg.top_k}"]
        parts.append(f"inhibition={cfg.inhibition!r}")
        if cfg.gate_rank is not None:
            parts.append(f"gate_rank={cfg.gate_rank}")
        parts += [f"score={cfg.score!r}", f"activation={cfg.activation!r}"]
        if cfg.capacity_factor is not None:
            parts.append(f"capacity_factor={cfg.capacity_factor}")
        return ", ".join(parts)

    def run(self, moe_forward, x: torch.Tensor, context=None) -> torch.Tensor:
        """Check the input, run ``moe_forward(self, tokens, sources)``, store ``aux``; return ``[..., D]``.

        Under ``torch.autocast`` the layer runs with autocast off, in the dtype of
        its parameters, and ``x`` is cast to that dtype first: every backend then
        computes the same thing, and the routing stays in float32 (float64 for a
        float64 layer). To run the experts in bfloat16, convert the layer with
        ``layer.to(torch.bfloat16)``.
        """
        autocast = isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type)
        if autocast and x.is_floating_point():
            x = x.to(self.router_weight.dtype)
        tokens, sources = self.check_input(x, context)
        scope = torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()
        with scope:
            y, self.aux = moe_forward(self, tokens, sources)
        return y.reshape(x.shape)

    def check_input(self, x: torch.Tensor, context=None):
        """Validate ``x`` (and the context sources) against the parameters; return ``x`` flattened to ``[N, D]``."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., {cfg.dim}] (last dimension = dim)")
        if not x.is_floating_point():
            raise TypeError(f"x has dtype {x.dtype}; expected a floating dtype")
        weight = self.router_weight
        if x.dtype != weight.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the layer parameters are {weight.dtype}; "
                f"convert one of them, for example layer.to({x.dtype})"
            )
        if x.device != weight.device:
            raise ValueError(
                f"x is on {x.device} but the layer parameters are on {weight.device}; move one of them, "
                f"for example layer.to({str(x.device)!r})"
            )
        self._check_parameters()
        sources = self._check_context(context, x)
        return x.reshape(-1, cfg.dim), sources

    def _check_parameters(self) -> None:
        weight = self.router_weight
        for name, parameter in self.named_parameters():
            if parameter.dtype != weight.dtype:
                raise TypeError(
                    f"parameter {name} has dtype {parameter.dtype} but router_weight has {weight.dtype}; "
                    f"the layer's parameters must share one dtype, for example layer.to({weight.dtype})"
                )
            if parameter.device != weight.device:
                raise ValueError(
                    f"parameter {name} is on {parameter.device} but router_weight is on {weight.device}; "
                    f"the layer's parameters must share one device, for example layer.to({str(weight.device)!r})"
                )

    def _check_context(self, context, x):
        cfg = self.config
        if context is None:
            return [None] * len(cfg.context_dims)
        if cfg.inhibition != "global":
            raise ValueError(f"context was given but inhibition={cfg.inhibition!r}; context needs inhibition='global'")
        if isinstance(context, torch.Tensor):
            context = [context]
        elif not isinstance(context, (list, tuple)):
            raise TypeError(
                f"context must be a tensor, a list or tuple of tensors (or None entries), or None; "
                f"got {type(context).__name__}"
            )
        context = list(context)
        if len(context) != len(cfg.context_dims):
            raise ValueError(
                f"context has {len(context)} source(s); expected {len(cfg.context_dims)} (one per entry of context_dims)"
            )
        for i, (source, width) in enumerate(zip(context, cfg.context_dims)):
            if source is None:
                continue
            if not isinstance(source, torch.Tensor):
                raise TypeError(f"context[{i}] must be a torch.Tensor or None, got {type(source).__name__}")
            if source.dim() < 1 or source.shape[-1] != width:
                raise ValueError(f"context[{i}] has shape {tuple(source.shape)}; expected [..., {width}] (context_dims[{i}])")
            if not source.is_floating_point():
                raise TypeError(f"context[{i}] has dtype {source.dtype}; expected a floating dtype")
            if source.device != x.device:
                raise ValueError(f"context[{i}] is on {source.device} but x is on {x.device}")
            if source.reshape(-1, width).shape[0] == 0:
                raise ValueError(f"context[{i}] has shape {tuple(source.shape)} with no rows; pass None for an absent source")
        return context
