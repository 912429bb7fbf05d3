"""Conversion of the sparse MoE blocks of Hugging Face ``transformers`` models.

:func:`convert_block` builds an :class:`~inhibmoe_fast.layer.InhibitedMoE`
with the router and expert weights of a Mixtral-style block
(``MixtralSparseMoeBlock``) or of a Qwen2-MoE block (``Qwen2MoeSparseMoeBlock``,
whose shared expert is kept beside the layer by :class:`SharedExpertMoE`).
With ``inhibition="none"`` the converted block computes the same function.
:func:`replace_moe_blocks` swaps every such block of a model in place, and
:func:`add_inhibition` turns inhibition on in a converted layer for fine-tuning.

Both block styles store their experts as ``gate_up_proj [E, 2F, D]`` (gate
rows first) and ``down_proj [E, D, F]``, which is the layout of
``InhibitedMoE.expert_up`` and ``expert_down`` for SwiGLU, so the weights are
copied as they are. This is the layout of ``transformers`` 5; blocks of other
layouts are rejected with an error that names what is missing.

The converted module returns the hidden states only. The routing of each call
is in ``layer.aux``, not in the outputs that ``transformers`` records. Its
``loss`` contains the load-balancing and z-losses when their coefficients are set.
Router jitter noise, an option of Mixtral training, is not applied.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .layer import InhibitedMoE

BLOCK_CLASSES = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock")


class SharedExpertMoE(nn.Module):
    """An MoE layer plus a shared expert scaled by a sigmoid gate: ``moe(x) + sigmoid(g(x)) * shared(x)``."""

    def __init__(self, moe: InhibitedMoE, shared_expert: nn.Module, shared_expert_gate: nn.Module):
        super().__init__()
        self.moe = moe
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    @property
    def aux(self):
        """Routing results and auxiliary losses of the MoE layer's last call."""
        return self.moe.aux

    def forward(self, hidden_states: torch.Tensor, context=None) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return self.moe(hidden_states, context) + shared


def _expert_weights(block: nn.Module):
    experts = getattr(block, "experts", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise TypeError(
            f"{type(block).__name__} has no experts.gate_up_proj [E, 2F, D] and experts.down_proj [E, D, F] "
            "tensors; convert_block reads the expert layout of transformers 5"
        )
    activation = getattr(getattr(experts, "act_fn", None), "__class__", type(None)).__name__
    if activation not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"{type(block).__name__} uses the expert activation {activation}; only SiLU (SwiGLU) converts")
    return gate_up, down


def convert_block(block: nn.Module, **options) -> nn.Module:
    """Return an inhibited MoE module with the weights of a Mixtral or Qwen2-MoE sparse block.

    ``options`` are those of :class:`InhibitedMoE` (``inhibition`` defaults to
    ``"none"``, which keeps the block's function; ``backend`` too). The module
    is created on the block's device and in its dtype.
    """
    name = type(block).__name__
    if name not in BLOCK_CLASSES:
        raise TypeError(f"cannot convert {name}; expected one of {', '.join(BLOCK_CLASSES)}")
    router = block.gate
    router_weight = router.weight
    gate_up, down = _expert_weights(block)
    experts, dim = router_weight.shape
    hidden = down.shape[2]
    renormalize = True if name == "MixtralSparseMoeBlock" else bool(router.norm_topk_prob)
    options.setdefault("inhibition", "none")
    for fixed in ("score", "activation", "router_bias", "expert_bias", "renormalize"):
        if fixed in options:
            raise TypeError(f"option {fixed!r} is set by the block being converted; remove it")
    layer = InhibitedMoE(dim, hidden, experts, router.top_k, device=router_weight.device, dtype=router_weight.dtype,
                         score="softmax", activation="swiglu", router_bias=False, expert_bias=False,
                         renormalize=renormalize, **options)
    with torch.no_grad():
        layer.router_weight.copy_(router_weight)
        layer.expert_up.copy_(gate_up)
        layer.expert_down.copy_(down)
    if name == "Qwen2MoeSparseMoeBlock":
        return SharedExpertMoE(layer, block.shared_expert, block.shared_expert_gate)
    return layer


def replace_moe_blocks(model: nn.Module, **options) -> List[str]:
    """Replace every Mixtral or Qwen2-MoE sparse block of ``model`` in place; return the replaced names."""
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ in BLOCK_CLASSES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert_block(module, **options))
    return [name for name, _ in targets]


def add_inhibition(layer, inhibition: str = "local", gate_rank=None, open_gate_bias: float = 4.0, **options):
    """Return a copy of ``layer`` with an inhibition gate that starts almost open.

    The gate starts with zero weights and a bias of ``open_gate_bias``, so the
    router input is ``sigmoid(open_gate_bias) * x`` (0.98 x for 4.0). Without a
    router bias that scales every logit by the same factor, which keeps each
    token's ranking of the experts, and fine-tuning trains the gate from there.

    ``layer`` is an :class:`InhibitedMoE` or a :class:`SharedExpertMoE`; for the
    latter the copy keeps the same shared expert and gate modules.
    """
    if inhibition not in ("local", "global"):
        raise ValueError(f"inhibition={inhibition!r} is invalid; add_inhibition adds a 'local' or 'global' gate")
    if isinstance(layer, SharedExpertMoE):
        moe = add_inhibition(layer.moe, inhibition, gate_rank, open_gate_bias, **options)
        return SharedExpertMoE(moe, layer.shared_expert, layer.shared_expert_gate)
    if not isinstance(layer, InhibitedMoE):
        raise TypeError(
            f"add_inhibition takes an InhibitedMoE or a SharedExpertMoE, got {type(layer).__name__}; "
            f"convert a sparse MoE block with convert_block or replace_moe_blocks first"
        )
    cfg = layer.config
    # The gate's own settings come from the arguments. dropout_p belongs to the dropout
    # inhibition only, and the context sources to the global one only.
    skipped = {"dim", "hidden_dim", "num_experts", "top_k", "inhibition", "gate_rank", "dropout_p"}
    if inhibition != "global":
        skipped.add("context_dims")
    settings = {field: getattr(cfg, field) for field in cfg.__dataclass_fields__ if field not in skipped}
    settings.update(options)
    new = InhibitedMoE(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k, backend=layer.backend,
                       device=layer.router_weight.device, dtype=layer.router_weight.dtype,
                       inhibition=inhibition, gate_rank=gate_rank, **settings)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith(("inhibit_", "context_weights"))}
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        for parameter_name in ("inhibit_weight", "inhibit_u"):
            if hasattr(new, parameter_name):
                getattr(new, parameter_name).zero_()
        new.inhibit_bias.fill_(open_gate_bias)
    return new
