"""Reference inhibited MoE layer in plain PyTorch: the ground truth of every fast path.

The layer, for tokens ``x [N, D]``:

1. Inhibition gate. ``none``: ``u = x``. ``dropout``: ``u = dropout(x, p)`` in
   training. ``local``: ``u = x * sigmoid(x W_g^T + b_g)``. ``global``: as local,
   with ``sum_s align(C_s) W_s^T`` added to the gate pre-activation, where each
   context source ``C_s`` is max-pooled to ``N`` rows (:func:`maxpool_align`).
   A low-rank gate uses ``W_g = U V``.
2. Router logits ``z = u W_r^T + b_r`` in float32 (float64 for float64 inputs).
3. Scores ``softmax(z)`` or ``sigmoid(z)``; the ``k`` best experts, ties to the
   lower index and NaN counted as the largest score. Weights are the chosen
   scores, divided by their sum when ``renormalize``.
4. Dispatch: the (token, slot) pairs of each expert in token order; with a
   capacity, only the first ``ceil(c N k / E)`` pairs of each expert are kept.
5. Experts: ``down(act(up(x)))`` with GELU or ReLU, or ``down(silu(gate(x)) * up(x))``
   with SwiGLU, where one up projection computes both ``gate(x)`` and ``up(x)``.
6. Combine: ``y_t = sum_j w[t, j] * expert_{id[t, j]}(x_t)`` summed in slot order,
   in the routing dtype; dropped pairs contribute zero.

Everything here favours clarity over speed: the experts run in a Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import MoEConfig
from .outputs import MoEAux
from .parameters import MoEParameters


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of the routing math for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def maxpool_align(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Max-pool the rows of ``x [..., C]`` to ``n_out`` rows with ``adaptive_max_pool1d``; return the values."""
    rows = x.reshape(-1, x.shape[-1])
    if n_out == 0:
        return rows[:0]  # adaptive_max_pool1d has no backward for an empty output
    return F.adaptive_max_pool1d(rows.t().unsqueeze(0), n_out)[0].t()


def inhibit(layer: MoEParameters, x: torch.Tensor, context) -> torch.Tensor:
    """Apply the inhibition of ``layer`` to tokens ``x [N, D]`` and return the router input ``u``."""
    cfg = layer.config
    if cfg.inhibition == "none":
        return x
    if cfg.inhibition == "dropout":
        return F.dropout(x, cfg.dropout_p, layer.training)
    pre_activation = x @ layer.gate_weight.t() + layer.inhibit_bias
    for source, weight in zip(context, getattr(layer, "context_weights", [])):
        if source is not None:
            aligned = maxpool_align(source, x.shape[0]).to(x.dtype)
            pre_activation = pre_activation + aligned @ weight.t()
    return x * torch.sigmoid(pre_activation)


def router_logits(layer: MoEParameters, u: torch.Tensor) -> torch.Tensor:
    """Return the router logits ``u W_r^T + b_r`` in the routing dtype."""
    dtype = routing_dtype(u.dtype)
    logits = u.to(dtype) @ layer.router_weight.to(dtype).t()
    if layer.router_bias is not None:
        logits = logits + layer.router_bias.to(dtype)
    return logits


def scores_from_logits(cfg: MoEConfig, logits: torch.Tensor) -> torch.Tensor:
    """Return the router scores (softmax or sigmoid of the logits)."""
    return torch.softmax(logits, dim=-1) if cfg.score == "softmax" else torch.sigmoid(logits)


def normalized_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """Return ``sigmoid(z) / sum(sigmoid(z))`` along the last dimension, finite for finite logits.

    It is computed as a softmax of log-sigmoids: dividing the sigmoids themselves
    gives 0 / 0 once every sigmoid of a row rounds to zero (logits below about -88
    in float32).
    """
    return torch.softmax(F.logsigmoid(logits), dim=-1)


def combine_weights(cfg: MoEConfig, scores: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Return the combine weights of the chosen experts ``ids``: their scores, renormalized if configured."""
    if not cfg.renormalize:
        return scores.gather(1, ids)
    if cfg.score == "sigmoid":
        return normalized_sigmoid(logits.gather(1, ids))
    weights = scores.gather(1, ids)
    return weights / weights.sum(dim=-1, keepdim=True)


def select_experts(cfg: MoEConfig, scores: torch.Tensor, logits: torch.Tensor):
    """Return ``(ids, weights)`` of the ``top_k`` best scores per row.

    A stable descending sort orders equal scores by expert index, so the lower
    index wins ties. The sort puts NaN first, and the ids of a row are always distinct.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ids = order[:, : cfg.top_k]
    return ids, combine_weights(cfg, scores, logits, ids)


def auxiliary_losses(cfg: MoEConfig, logits, scores, counts):
    """Return ``(load_balance_loss, z_loss, loss)``; all are zero for an empty batch."""
    num_tokens = logits.shape[0]
    probs = scores if cfg.score == "softmax" else normalized_sigmoid(logits)
    mean_prob = probs.sum(dim=0) / max(num_tokens, 1)
    fraction = counts.to(logits.dtype) / max(num_tokens * cfg.top_k, 1)
    load_balance = cfg.num_experts * (fraction * mean_prob).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().sum() / max(num_tokens, 1)
    loss = cfg.load_balance_coef * load_balance + cfg.z_loss_coef * z_loss
    return load_balance, z_loss, loss


def expert_mlp(layer: MoEParameters, e: int, x: torch.Tensor) -> torch.Tensor:
    """Run expert ``e`` on rows ``x [M, D]``."""
    cfg = layer.config

    def bias(name):
        tensor = getattr(layer, name)
        return None if tensor is None else tensor[e]

    up = F.linear(x, layer.expert_up[e], bias("expert_up_bias"))
    if cfg.activation == "swiglu":
        gate, up = up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
    elif cfg.activation == "gelu":
        hidden = F.gelu(up)
    else:
        hidden = F.relu(up)
    return F.linear(hidden, layer.expert_down[e], bias("expert_down_bias"))


def moe_forward(layer: MoEParameters, x: torch.Tensor, context):
    """Run the whole layer on ``x [N, D]``; return ``(y [N, D], aux)``."""
    cfg = layer.config
    num_tokens, k = x.shape[0], cfg.top_k
    dtype = routing_dtype(x.dtype)

    u = inhibit(layer, x, context)
    logits = router_logits(layer, u)
    scores = scores_from_logits(cfg, logits)
    ids, weights = select_experts(cfg, scores, logits)
    counts = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)

    expert_input = u if cfg.inhibit_experts else x
    capacity = cfg.capacity(num_tokens)
    kept = torch.zeros_like(ids, dtype=torch.bool)
    pair_out = x.new_zeros(num_tokens, k, cfg.dim)
    for e in range(cfg.num_experts):
        chosen = ids == e
        if capacity is not None:
            # Keep the first `capacity` pairs in token order (an expert fills at most one slot per token).
            chosen = chosen & (chosen.flatten().cumsum(0) <= capacity).view_as(chosen)
        tokens, slots = torch.nonzero(chosen, as_tuple=True)  # row-major: token order
        kept[tokens, slots] = True
        # An expert with no tokens still runs (on zero rows), so its gradients are zeros, not None.
        pair_out = pair_out.index_put((tokens, slots), expert_mlp(layer, e, expert_input[tokens]))

    y = x.new_zeros(num_tokens, cfg.dim, dtype=dtype)
    for j in range(k):
        contribution = weights[:, j, None] * pair_out[:, j].to(dtype)
        y = y + torch.where(kept[:, j, None], contribution, torch.zeros_like(contribution))

    load_balance, z_loss, loss = auxiliary_losses(cfg, logits, scores, counts)
    aux = MoEAux(logits, ids, weights, counts, kept, load_balance, z_loss, loss)
    return y.to(x.dtype), aux


class ReferenceMoE(MoEParameters):
    """Inhibited MoE layer in plain PyTorch, written for clarity.

    Takes ``x [..., D]`` and an optional ``context`` (one tensor or ``None`` per
    entry of ``context_dims``, global inhibition only) and returns ``[..., D]``.
    After each call ``self.aux`` contains the :class:`MoEAux` of that call.
    Options are those of :class:`~inhibmoe_fast.config.MoEConfig`.
    """

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return self.run(moe_forward, x, context)
