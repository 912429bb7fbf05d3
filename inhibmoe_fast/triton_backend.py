"""The inhibited MoE layer on the Triton kernels (the ``"triton"`` backend).

Every step runs on the device with no host synchronisation:

1. routing: the fused kernels of :mod:`inhibmoe_fast.routing` compute gate,
   logits, top-k, weights and the dispatch order of the pairs;
2. :func:`~inhibmoe_fast.kernels.experts.expert_layout` marks the pairs that a
   capacity limit drops;
3. the expert kernels (:mod:`inhibmoe_fast.expert_ops`) run the grouped up
   projection with the activation, the down projection and the combine;
4. the auxiliary losses follow in PyTorch from the logits and counts.

Inputs are CUDA tensors of float32, bfloat16 or float16, or CPU tensors when
``TRITON_INTERPRET=1`` was set before the kernels were first used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, settings
from .expert_ops import experts
from .outputs import MoEAux
from .parameters import MoEParameters
from .reference import auxiliary_losses, scores_from_logits
from .routing import route
from .torch_backend import inhibit


def context_inputs(layer: MoEParameters, x: torch.Tensor, context):
    """Return ``(aligned sources [N, C], weights [D, C])`` of the global context, or ``(None, None)``.

    Each present source is max-pooled to the ``N`` rows of ``x`` and cast to
    its dtype. The sources and their projection matrices are concatenated along
    the feature dimension, so the kernel adds ``sum_s aligned_s W_s^T`` as one product.
    """
    weights = getattr(layer, "context_weights", None)
    if weights is None or context is None:
        return None, None
    sources, projections = [], []
    for source, weight in zip(context, weights):
        if source is not None:
            sources.append(ops.maxpool_align(source, x.shape[0])[0].to(x.dtype))
            projections.append(weight)
    if not sources:
        return None, None
    if len(sources) == 1:
        return sources[0], projections[0]
    return torch.cat(sources, dim=1), torch.cat(projections, dim=1)


def moe_forward(layer: MoEParameters, x: torch.Tensor, context):
    """Run the whole layer on ``x [N, D]`` with the Triton kernels; return ``(y [N, D], aux)``.

    Inhibition ``"dropout"`` applies ``torch.nn.functional.dropout`` in
    PyTorch (in training) and routes the result without a gate; experts fed
    with the router input see the same mask. Float64 layers raise ``TypeError``.
    """
    cfg = layer.config
    if x.dtype == torch.float64:
        raise TypeError(
            "backend='triton' does not support float64 (the kernels take float32, bfloat16 and float16); "
            "use backend='torch' or 'reference' for float64"
        )
    gate = {}
    router_input = x
    if cfg.inhibition == "dropout":
        router_input = F.dropout(x, cfg.dropout_p, layer.training)
    elif cfg.has_gate:
        if cfg.gate_rank is None:
            gate["gate_weight"] = layer.inhibit_weight
        else:
            gate["gate_u"], gate["gate_v"] = layer.inhibit_u, layer.inhibit_v
        gate["gate_bias"] = layer.inhibit_bias
        gate["context"], gate["context_weight"] = context_inputs(layer, x, context)
    routing = route(router_input, layer.router_weight, layer.router_bias, top_k=cfg.top_k, score=cfg.score,
                    renormalize=cfg.renormalize, dispatch=True, **gate)

    from .kernels.experts import expert_layout

    layout = expert_layout(routing.ids, cfg.num_experts, cfg.capacity(x.shape[0]), routing.order, routing.offsets,
                           routing.counts)
    expert_input = x
    if cfg.inhibit_experts:
        # The routing kernels keep u in registers, so the gated input is recomputed here.
        expert_input = inhibit(layer, x, context) if cfg.has_gate else router_input
    y = experts(expert_input, routing.weights, layout, layer.expert_up, layer.expert_up_bias, layer.expert_down,
                layer.expert_down_bias, cfg.activation, autotune=not settings.is_deterministic())

    logits = routing.logits
    load_balance, z_loss, loss = auxiliary_losses(cfg, logits, scores_from_logits(cfg, logits), routing.counts)
    aux = MoEAux(logits, routing.ids, routing.weights, routing.counts, layout.kept, load_balance, z_loss, loss)
    return y, aux
