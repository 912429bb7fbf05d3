"""Fast inhibited MoE layer in vectorised PyTorch (the ``"torch"`` backend).

It computes what :mod:`inhibmoe_fast.reference` computes, without a Python
loop over experts in the autograd graph:

- top-k through ``torch.topk``, with a stable sort only for the rows where a
  tie or a NaN makes the order of ``topk`` unspecified;
- dispatch by one stable sort of the ``N * k`` expert ids, so each expert's
  pairs are contiguous and in token order;
- experts as grouped matrix multiplies over those contiguous rows
  (:func:`~inhibmoe_fast.grouped.grouped_linear`);
- combine by scattering the expert rows back to ``[N, k, D]`` and summing the
  weighted slots in slot order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .config import MoEConfig
from .grouped import grouped_linear
from .outputs import MoEAux
from .parameters import MoEParameters
from .reference import auxiliary_losses, routing_dtype, scores_from_logits


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


def select_experts(cfg: MoEConfig, scores: torch.Tensor):
    """Return ``(ids, weights)`` of the ``top_k`` best scores, ties to the lower index, NaN first."""
    k, num_experts = cfg.top_k, cfg.num_experts
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
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def dispatch(cfg: MoEConfig, ids: torch.Tensor):
    """Group the ``N * k`` (token, slot) pairs by expert.

    Returns ``(pairs, counts, kept_counts, kept)``: ``pairs`` are the flat pair
    numbers ``token * k + slot`` of the kept pairs, grouped by expert and in
    token order inside each group; ``counts`` the routed pairs per expert;
    ``kept_counts`` the pairs per expert after the capacity limit; ``kept`` the
    ``[N, k]`` mask of kept pairs.
    """
    num_tokens, k = ids.shape
    flat = ids.reshape(-1)
    pairs = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=cfg.num_experts)
    capacity = cfg.capacity(num_tokens)
    if capacity is None or capacity >= num_tokens * k:
        return pairs, counts, counts, torch.ones_like(ids, dtype=torch.bool)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(pairs.numel(), device=ids.device) - starts[flat[pairs]]
    pairs = pairs[rank_in_expert < capacity]
    kept = torch.zeros(num_tokens * k, dtype=torch.bool, device=ids.device)
    kept[pairs] = True
    return pairs, counts, counts.clamp(max=capacity), kept.view(num_tokens, k)


def _expert_bias(rows: torch.Tensor, bias, expert_of_row):
    return rows if bias is None else rows + bias.index_select(0, expert_of_row)


def experts(layer: MoEParameters, rows: torch.Tensor, kept_counts: torch.Tensor) -> torch.Tensor:
    """Run the experts on ``rows [M, D]`` grouped by expert, ``kept_counts[e]`` rows each."""
    cfg = layer.config
    ends_tensor = torch.cumsum(kept_counts, 0)
    ends = ends_tensor.tolist()
    offsets = ends_tensor.to(torch.int32)
    expert_of_row = None
    if cfg.expert_bias:
        expert_of_row = torch.repeat_interleave(torch.arange(cfg.num_experts, device=rows.device), kept_counts)

    up = _expert_bias(grouped_linear(rows, layer.expert_up, ends, offsets), layer.expert_up_bias, expert_of_row)
    if cfg.activation == "swiglu":
        gate = grouped_linear(rows, layer.expert_gate, ends, offsets)
        hidden = F.silu(_expert_bias(gate, layer.expert_gate_bias, expert_of_row)) * up
    elif cfg.activation == "gelu":
        hidden = F.gelu(up)
    else:
        hidden = F.relu(up)
    out = grouped_linear(hidden, layer.expert_down, ends, offsets)
    return _expert_bias(out, layer.expert_down_bias, expert_of_row)


def moe_forward(layer: MoEParameters, x: torch.Tensor, context):
    """Run the whole layer on ``x [N, D]``; return ``(y [N, D], aux)``."""
    cfg = layer.config
    num_tokens, k, dim = x.shape[0], cfg.top_k, cfg.dim
    dtype = routing_dtype(x.dtype)

    u = inhibit(layer, x, context)
    logits = u.to(dtype) @ layer.router_weight.to(dtype).t()
    if layer.router_bias is not None:
        logits = logits + layer.router_bias.to(dtype)
    scores = scores_from_logits(cfg, logits)
    ids, weights = select_experts(cfg, scores)
    pairs, counts, kept_counts, kept = dispatch(cfg, ids)

    expert_input = u if cfg.inhibit_experts else x
    rows = expert_input.index_select(0, torch.div(pairs, k, rounding_mode="floor"))
    expert_out = experts(layer, rows, kept_counts)

    # Scatter the expert rows back to their (token, slot) place; dropped pairs stay zero.
    pair_out = expert_out.new_zeros(num_tokens * k, dim).index_copy(0, pairs, expert_out).view(num_tokens, k, dim)
    slot_weights = weights if bool(kept.all()) else torch.where(kept, weights, torch.zeros_like(weights))
    y = slot_weights[:, 0, None] * pair_out[:, 0].to(dtype)
    for j in range(1, k):
        y = y + slot_weights[:, j, None] * pair_out[:, j].to(dtype)

    load_balance, z_loss, loss = auxiliary_losses(cfg, logits, scores, counts)
    return y.to(x.dtype), MoEAux(logits, ids, weights, counts, kept, load_balance, z_loss, loss)
