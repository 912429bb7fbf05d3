"""Fast inhibited MoE layer in vectorised PyTorch (the ``"torch"`` backend).

It computes what :mod:`inhibmoe_fast.reference` computes, without a Python
loop over experts in the autograd graph:

- top-k through ``torch.topk``, with a stable sort only for the rows where a
  tie or a NaN makes the order of ``topk`` unspecified;
- dispatch by one stable sort of the ``N * k`` expert ids
  (:mod:`~inhibmoe_fast.dispatch`), so each expert's pairs are contiguous and
  in token order;
- experts as one batched matrix multiply over rows padded to the largest
  expert when the load is balanced enough, as grouped matrix multiplies
  (:func:`~inhibmoe_fast.grouped.grouped_linear`) otherwise;
- combine by gathering the expert rows back to ``[N, k, D]`` and summing the
  weighted slots in slot order.

Under ``torch.compile`` the steps that read data on the host (the tie check of
top-k, the buffer size and layout of the dispatch, the group ends) take
fixed-shape forms instead: a stable sort of every row, the dispatch of
:func:`~inhibmoe_fast.dispatch.plan_fixed_dispatch`, and the grouped matrix
multiplies as the custom operator ``inhibmoe_fast::grouped_linear``. So
``torch.compile(..., fullgraph=True)`` traces the layer in one graph, with
``dynamic=True`` as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .activations import swiglu
from .config import MoEConfig
from .dispatch import DispatchPlan, gather_tokens, plan_dispatch, plan_fixed_dispatch, scatter_pairs
from .grouped import batched_linear, grouped_linear
from .outputs import MoEAux, Routing
from .parameters import MoEParameters
from .reference import auxiliary_losses, combine_weights, routing_dtype, scores_from_logits


def inhibit(layer: MoEParameters, x: torch.Tensor, context) -> torch.Tensor:
    """Return the router input ``u`` for tokens ``x [N, D]``."""
    cfg = layer.config
    if cfg.inhibition == "none":
        return x
    if cfg.inhibition == "dropout":
        return F.dropout(x, cfg.dropout_p, layer.training)
    if cfg.gate_rank is None:
        pre_activation = torch.addmm(layer.inhibit_bias, x, layer.inhibit_weight.t())
    else:
        pre_activation = torch.addmm(layer.inhibit_bias, x @ layer.inhibit_v.t(), layer.inhibit_u.t())
    for source, weight in zip(context, getattr(layer, "context_weights", [])):
        if source is not None:
            aligned = ops.maxpool_align(source, x.shape[0])[0].to(x.dtype)
            pre_activation = pre_activation.addmm(aligned, weight.t())
    return x * torch.sigmoid(pre_activation)


def select_experts(cfg: MoEConfig, scores: torch.Tensor, logits: torch.Tensor):
    """Return ``(ids, weights)`` of the ``top_k`` best scores, ties to the lower index, NaN first."""
    k, num_experts = cfg.top_k, cfg.num_experts
    if torch.compiler.is_compiling():
        # The tie check below needs a host read, so compiled graphs sort every row.
        ids = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        return ids, combine_weights(cfg, scores, logits, ids)
    if k < num_experts:
        values, ids = torch.topk(scores, k + 1, dim=-1)
        # topk leaves the order of equal values unspecified: redo the rows with a tie
        # among the k + 1 best, or with a NaN anywhere, by a stable sort.
        unclear = (values[:, :-1] == values[:, 1:]).any(dim=-1) | scores.isnan().any(dim=-1)
        ids = ids[:, :k]
    else:
        unclear = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        ids = torch.empty(scores.shape[0], k, dtype=torch.long, device=scores.device)
    rows = unclear.nonzero().squeeze(1)
    if rows.numel():
        ids = ids.index_copy(0, rows, torch.sort(scores[rows], dim=-1, descending=True, stable=True).indices[:, :k])
    return ids, combine_weights(cfg, scores, logits, ids)


# The padded layout is used while its buffer has at most this many rows per kept pair.
PADDED_LAYOUT_MAX_RATIO = 1.1


def _linear(rows, weight, bias, layout: str, ends, offsets, expert_of_row):
    """Apply each expert's ``weight [E, out, in]`` (and ``bias [E, out]``) to its rows."""
    if layout == "padded":
        out = batched_linear(rows.view(weight.shape[0], -1, rows.shape[-1]), weight)
        if bias is not None:
            out = out + bias.unsqueeze(1)
        return out.view(-1, weight.shape[1])
    out = grouped_linear(rows, weight, ends, offsets)
    return out if bias is None else out + bias.index_select(0, expert_of_row)


def experts(layer: MoEParameters, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Run every expert MLP on its rows of ``rows [R, D]`` (in the layout of ``plan``); return ``[R, D]``."""
    return run_experts(layer, rows, plan.layout, plan.group_sizes)


def run_experts(layer: MoEParameters, rows: torch.Tensor, layout: str, group_sizes: torch.Tensor) -> torch.Tensor:
    """Run every expert MLP on its rows of ``rows [R, D]``; return ``[R, D]``.

    ``layout`` is that of :class:`~inhibmoe_fast.dispatch.DispatchPlan`: ``"grouped"``
    (expert ``e`` owns the next ``group_sizes[e]`` rows) or ``"padded"``.
    """
    cfg = layer.config
    ends = offsets = expert_of_row = None
    if layout == "grouped":
        ends_tensor = torch.cumsum(group_sizes, 0)
        offsets = ends_tensor.to(torch.int32)
        # A host copy would end a compiled graph, so under torch.compile the operator reads
        # the ends itself when its loop needs them.
        ends = None if torch.compiler.is_compiling() else ends_tensor.tolist()
        if cfg.expert_bias:
            expert_ids = torch.arange(cfg.num_experts, device=rows.device)
            expert_of_row = torch.repeat_interleave(expert_ids, group_sizes, output_size=rows.shape[0])
    plan_args = (layout, ends, offsets, expert_of_row)

    up = _linear(rows, layer.expert_up, layer.expert_up_bias, *plan_args)
    if cfg.activation == "swiglu" and torch.compiler.is_compiling():
        # swiglu's backward writes through out= views, which torch.compile cannot trace;
        # the compiler fuses the plain form instead.
        gate, linear = up.chunk(2, dim=-1)
        hidden = F.silu(gate) * linear
    elif cfg.activation == "swiglu":
        hidden = swiglu(up)
    elif cfg.activation == "gelu":
        hidden = F.gelu(up)
    else:
        hidden = F.relu(up)
    return _linear(hidden, layer.expert_down, layer.expert_down_bias, *plan_args)


def route(layer: MoEParameters, x: torch.Tensor, context) -> Routing:
    """Route tokens ``x [N, D]``: inhibition gate, router logits, scores and top-k."""
    cfg = layer.config
    dtype = routing_dtype(x.dtype)
    u = inhibit(layer, x, context)
    logits = u.to(dtype) @ layer.router_weight.to(dtype).t()
    if layer.router_bias is not None:
        logits = logits + layer.router_bias.to(dtype)
    scores = scores_from_logits(cfg, logits)
    ids, weights = select_experts(cfg, scores, logits)
    return Routing(logits, ids, weights, scores, u)


def moe_forward(layer: MoEParameters, x: torch.Tensor, context):
    """Run the whole layer on ``x [N, D]``; return ``(y [N, D], aux)``."""
    cfg = layer.config
    num_tokens, k, dim = x.shape[0], cfg.top_k, cfg.dim
    routing = route(layer, x, context)
    logits, ids, weights = routing.logits, routing.ids, routing.weights
    scores = routing.scores
    expert_input = routing.gated_input if cfg.inhibit_experts else x

    if torch.compiler.is_compiling():
        plan = plan_fixed_dispatch(ids, cfg.num_experts, cfg.capacity(num_tokens))
    else:
        plan = plan_dispatch(ids, cfg.num_experts, cfg.capacity(num_tokens), PADDED_LAYOUT_MAX_RATIO)
    rows = gather_tokens(expert_input, plan, k)
    pair_out = scatter_pairs(experts(layer, rows, plan), plan).view(num_tokens, k, dim)

    # Dropped pairs have zero rows; a zero weight keeps a NaN weight from reaching them.
    slot_weights = weights if plan.all_kept else torch.where(plan.kept, weights, torch.zeros_like(weights))
    # The sum over the slot dimension adds the weighted slots in slot order.
    y = (pair_out.to(logits.dtype) * slot_weights.unsqueeze(-1)).sum(dim=1)

    load_balance, z_loss, loss = auxiliary_losses(cfg, logits, scores, plan.counts)
    aux = MoEAux(logits, ids, weights, plan.counts, plan.kept, load_balance, z_loss, loss)
    return y.to(x.dtype), aux
