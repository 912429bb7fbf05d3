"""Baseline MoE blocks that the benchmark compares the inhibited layer with.

:class:`MixtralStyleMoE` is a sparse MoE block written the way most models
write it today, after the Mixtral feed-forward block: a linear router, a
softmax in float32, top-k, renormalization of the chosen probabilities, then
a Python loop over the experts that selects each expert's tokens by index,
runs a SwiGLU MLP on them and adds the weighted result back with
``index_add_``. It has no inhibition, so with the same weights it computes
the same function as ``InhibitedMoE(inhibition="none", activation="swiglu",
score="softmax", renormalize=True)`` without a capacity limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .parameters import MoEParameters


class SwiGLUExpert(nn.Module):
    """One expert MLP, ``w2(silu(w1 x) * w3 x)``, with bias-free ``nn.Linear`` layers as in Mixtral."""

    def __init__(self, dim: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False, **factory)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False, **factory)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralStyleMoE(nn.Module):
    """Sparse MoE block with a Python loop over experts, as in the Mixtral feed-forward block.

    Takes ``x [..., D]`` and returns ``[..., D]``. Routing (softmax, top-k and
    renormalization) runs in float32, and the weights are cast back to the
    input dtype before the experts' outputs are scaled. Experts that receive
    no token are skipped, so their weights get no gradient in that step.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int = 2, *, router_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} is invalid; expected 1 <= top_k <= num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts, bias=router_bias, device=device, dtype=dtype)
        self.experts = nn.ModuleList(
            SwiGLUExpert(dim, hidden_dim, device=device, dtype=dtype) for _ in range(num_experts)
        )

    @classmethod
    def from_layer(cls, layer: MoEParameters) -> "MixtralStyleMoE":
        """Build a block with the router and expert weights of an inhibited layer (copies, not shared tensors).

        ``layer`` must use SwiGLU experts without biases. Its ``expert_up [E, 2F, D]``
        contains the gate rows ``0 .. F-1`` (``w1``) and the up rows ``F .. 2F-1``
        (``w3``); ``expert_down [E, D, F]`` becomes ``w2``. The inhibition
        parameters have no counterpart and are left out.
        """
        cfg = layer.config
        if cfg.activation != "swiglu" or cfg.expert_bias:
            raise ValueError(
                f"layer has activation={cfg.activation!r}, expert_bias={cfg.expert_bias}; "
                "MixtralStyleMoE needs activation='swiglu' and expert_bias=False"
            )
        weight = layer.router_weight
        block = cls(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k, router_bias=layer.router_bias is not None,
                    device=weight.device, dtype=weight.dtype)
        hidden = cfg.hidden_dim
        with torch.no_grad():
            block.gate.weight.copy_(weight)
            if layer.router_bias is not None:
                block.gate.bias.copy_(layer.router_bias)
            for e, expert in enumerate(block.experts):
                expert.w1.weight.copy_(layer.expert_up[e, :hidden])
                expert.w3.weight.copy_(layer.expert_up[e, hidden:])
                expert.w2.weight.copy_(layer.expert_down[e])
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        logits = self.gate(tokens)
        probs = torch.softmax(logits, dim=-1, dtype=routing_dtype)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(tokens.dtype)

        out = torch.zeros_like(tokens)
        # expert_mask[e, j, t] is True when slot j of token t chose expert e.
        expert_mask = F.one_hot(ids, self.num_experts).permute(2, 1, 0)
        hit = torch.nonzero(expert_mask.sum(dim=(1, 2))).squeeze(1).tolist()
        for e in hit:
            slot, token = torch.where(expert_mask[e])
            expert_out = self.experts[e](tokens[token]) * weights[token, slot, None]
            out.index_add_(0, token, expert_out)
        return out.reshape(x.shape)
