"""Dispatch of (token, slot) pairs to expert rows, and the two gathers that move data.

A token ``t`` routed to experts ``ids[t, 0..k-1]`` makes ``k`` pairs, numbered
``t * k + j``. The dispatch places the kept pairs of each expert in a buffer of
expert rows, in token order:

- ``"grouped"`` layout: the rows of expert ``e`` follow those of ``e - 1`` with no
  gap (``R = kept pairs``), for grouped matrix multiplies;
- ``"padded"`` layout: expert ``e`` owns rows ``e * C .. e * C + C - 1`` with ``C``
  the largest kept count (``R = E * C``), for one batched matrix multiply; the
  padding rows hold zeros.

``row_of_pair`` maps each pair to its row (``R`` for a dropped pair) and
``pair_of_row`` each row to its pair (``N * k`` for a padding row). Index ``R``
or ``N * k`` selects an appended zero row, so both gathers and their backwards
are plain ``index_select`` calls with no scatter and no atomics.

:func:`plan_dispatch` reads the per-expert counts on the host to size the
buffer. :func:`plan_fixed_dispatch` builds a grouped plan whose shapes depend
on ``N`` and ``k`` alone, for ``torch.compile``: every pair gets a row, and a
dropped pair's row reads zeros and is not copied back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Placement of every (token, slot) pair in the expert buffer.

    Attributes:
        layout: ``"grouped"`` or ``"padded"``.
        counts: pairs routed to each expert ``[E]``, before the capacity limit.
        kept_counts: pairs kept per expert ``[E]`` (equal to ``counts`` without capacity).
        group_sizes: rows of each expert in the grouped layout ``[E]``: ``kept_counts``, or
            ``counts`` for a plan from :func:`plan_fixed_dispatch`.
        kept: ``[N, k]`` bool mask of kept pairs.
        row_of_pair: ``[N * k]`` row of each pair, ``num_rows`` for a dropped pair.
        pair_of_row: ``[num_rows]`` pair of each row, ``N * k`` for a padding row.
        num_rows: rows of the expert buffer (``R``).
        rows_per_expert: ``C`` of the padded layout, ``None`` for the grouped one.
        all_kept: no pair dropped.
        has_padding: some rows belong to no pair (padded layout only).
    """

    layout: str
    counts: torch.Tensor
    kept_counts: torch.Tensor
    group_sizes: torch.Tensor
    kept: torch.Tensor
    row_of_pair: torch.Tensor
    pair_of_row: torch.Tensor
    num_rows: int
    rows_per_expert: int | None
    all_kept: bool
    has_padding: bool


def plan_dispatch(ids: torch.Tensor, num_experts: int, capacity: int | None, max_padding: float = 1.3) -> DispatchPlan:
    """Plan the dispatch of the pairs of ``ids [N, k]`` to ``num_experts`` experts.

    Keeps at most ``capacity`` pairs per expert (the first in token order).
    Chooses the padded layout when its buffer has at most ``max_padding`` times
    as many rows as there are kept pairs, the grouped layout otherwise. Reads
    the per-expert counts on the host.
    """
    num_tokens, k = ids.shape
    num_pairs = num_tokens * k
    device = ids.device
    flat = ids.reshape(-1)
    sorted_pairs = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    kept_counts = counts if capacity is None else counts.clamp(max=capacity)

    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - starts[flat[sorted_pairs]]  # rank inside its expert
    keep = None if capacity is None or capacity >= num_pairs else rank < capacity
    all_kept = keep is None or bool(keep.all())
    if not all_kept:
        sorted_pairs, rank = sorted_pairs[keep], rank[keep]
    num_kept = sorted_pairs.numel()

    max_count = int(kept_counts.max()) if num_pairs else 0
    padded_rows = num_experts * max_count
    if num_kept > 0 and padded_rows <= max_padding * num_kept:
        layout, rows_per_expert, num_rows = "padded", max_count, padded_rows
        rows = flat[sorted_pairs] * max_count + rank
    else:
        layout, rows_per_expert, num_rows = "grouped", None, num_kept
        rows = torch.arange(num_kept, device=device)

    row_of_pair = torch.full((num_pairs,), num_rows, dtype=torch.long, device=device)
    row_of_pair[sorted_pairs] = rows
    pair_of_row = torch.full((num_rows,), num_pairs, dtype=torch.long, device=device)
    pair_of_row[rows] = sorted_pairs
    kept = row_of_pair.view(num_tokens, k) < num_rows
    return DispatchPlan(
        layout, counts, kept_counts, kept_counts, kept, row_of_pair, pair_of_row, num_rows, rows_per_expert, all_kept,
        num_rows > num_kept,
    )


def plan_fixed_dispatch(ids: torch.Tensor, num_experts: int, capacity: int | None) -> DispatchPlan:
    """Plan a grouped dispatch of the pairs of ``ids [N, k]`` with ``N * k`` rows, without host reads.

    Row ``i`` belongs to the ``i``-th pair in (expert, token) order, so expert
    ``e`` owns ``counts[e]`` rows. A pair beyond ``capacity`` in its expert
    keeps its row, but the row reads a zero token (``pair_of_row`` is ``N * k``)
    and the scatter skips it (``row_of_pair`` is ``R``), so it adds zero to the
    output and its gradients are zero. The experts then run on the rows of
    dropped pairs too, which costs compute in proportion to the pairs dropped.
    """
    num_tokens, k = ids.shape
    num_pairs = num_tokens * k
    device = ids.device
    flat = ids.reshape(-1)
    sorted_ids, sorted_pairs = torch.sort(flat, stable=True)
    # A scatter-add instead of bincount, whose output length depends on the largest id.
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).index_add_(0, flat, torch.ones_like(flat))
    kept_counts = counts if capacity is None else counts.clamp(max=capacity)

    rows = torch.arange(num_pairs, device=device)
    all_kept = capacity is None or capacity >= num_pairs
    if all_kept:
        pair_of_row = sorted_pairs
        row_at_sorted = rows
    else:
        starts = torch.cumsum(counts, 0) - counts
        keep = rows - starts[sorted_ids] < capacity  # the rank inside its expert is below the capacity
        pair_of_row = torch.where(keep, sorted_pairs, num_pairs)
        row_at_sorted = torch.where(keep, rows, num_pairs)
    row_of_pair = torch.empty_like(flat).scatter_(0, sorted_pairs, row_at_sorted)
    kept = row_of_pair.view(num_tokens, k) < num_pairs
    return DispatchPlan(
        "grouped", counts, kept_counts, counts, kept, row_of_pair, pair_of_row, num_pairs, None, all_kept, not all_kept
    )


def _select_rows(source: torch.Tensor, index: torch.Tensor, with_zero_row: bool) -> torch.Tensor:
    """Return ``source[index]``, where index ``len(source)`` selects a zero row if ``with_zero_row``."""
    if with_zero_row:
        source = torch.cat([source, source.new_zeros(1, source.shape[1])])
    return source.index_select(0, index)


class _GatherTokens(torch.autograd.Function):
    """Expert rows ``[R, D]`` from tokens ``[N, D]``; padding rows are zero."""

    @staticmethod
    def forward(ctx, x, plan: DispatchPlan, k: int):
        ctx.save_for_backward(plan.row_of_pair)
        ctx.k, ctx.all_kept = k, plan.all_kept
        token_of_row = torch.div(plan.pair_of_row, k, rounding_mode="floor")
        return _select_rows(x, token_of_row, plan.has_padding)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_of_pair,) = ctx.saved_tensors
        # Each token collects the gradients of its k slots, summed in slot order.
        grad = _select_rows(grad_rows, row_of_pair, not ctx.all_kept)
        return grad.view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None


class _ScatterPairs(torch.autograd.Function):
    """Pair outputs ``[N * k, D]`` from expert rows ``[R, D]``; dropped pairs are zero."""

    @staticmethod
    def forward(ctx, rows, plan: DispatchPlan):
        ctx.save_for_backward(plan.pair_of_row)
        ctx.has_padding = plan.has_padding
        return _select_rows(rows, plan.row_of_pair, not plan.all_kept)

    @staticmethod
    def backward(ctx, grad_pairs):
        (pair_of_row,) = ctx.saved_tensors
        return _select_rows(grad_pairs, pair_of_row, ctx.has_padding), None


def gather_tokens(x: torch.Tensor, plan: DispatchPlan, k: int) -> torch.Tensor:
    """Copy each kept pair's token row of ``x [N, D]`` to its expert row; return ``[R, D]``."""
    return _GatherTokens.apply(x, plan, k)


def scatter_pairs(rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Copy each pair's expert row back to pair order; return ``[N * k, D]`` (zeros for dropped pairs)."""
    return _ScatterPairs.apply(rows, plan)
