"""Auxiliary outputs that a layer keeps after each call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Routing:
    """Result of the routing step of one call (``N`` tokens, ``E`` experts, ``k`` per token).

    Attributes:
        logits: router logits ``[N, E]`` in the routing dtype.
        ids: chosen experts ``[N, k]`` (int64), best score first, ties to the lower index.
        weights: combine weights ``[N, k]`` in the routing dtype.
        scores: router scores ``[N, E]``, or ``None`` when the router did not keep them.
        gated_input: the router input ``u [N, D]``, or ``None`` when the router did not keep it.
    """

    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    scores: Optional[torch.Tensor] = None
    gated_input: Optional[torch.Tensor] = None


@dataclass
class MoEAux:
    """Routing results and auxiliary losses of one forward call.

    ``N`` is the number of tokens, ``E`` the number of experts and ``k`` the
    experts per token. Routing tensors are float32 (float64 for float64 inputs).

    Attributes:
        logits: router logits ``[N, E]``.
        ids: chosen experts ``[N, k]`` (int64), best score first, ties to the lower index.
        weights: combine weights ``[N, k]``.
        counts: (token, slot) pairs routed to each expert ``[E]`` (int64), before capacity dropping.
        kept: ``[N, k]`` bool, False for pairs dropped by the capacity limit.
        load_balance_loss: ``E * sum_e f_e * P_e``, with ``f_e`` the fraction of pairs routed to
            expert ``e`` and ``P_e`` its mean router probability (scores divided by their sum per token).
        z_loss: mean over tokens of ``logsumexp(logits) ** 2``.
        loss: ``load_balance_coef * load_balance_loss + z_loss_coef * z_loss``; add it to the training loss.
    """

    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    kept: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    loss: torch.Tensor
