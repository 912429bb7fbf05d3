"""Expert parallelism: the experts of an inhibited MoE layer sharded over a process group.

Each of the ``W`` ranks keeps the whole routing (inhibition gate, context
projections, router) and ``E / W`` experts: rank ``r`` owns experts
``r * E / W`` to ``(r + 1) * E / W - 1``. A forward call on a rank's own tokens

1. routes them as the single-process layer does;
2. sorts the (token, slot) pairs by expert, so the pairs of each rank's experts
   are contiguous, and sends them with one ``all_to_all`` (after a smaller one
   that exchanges the per-expert counts);
3. runs the local experts on the received rows, grouped by expert;
4. sends the results back with a second ``all_to_all`` and combines them.

The backward runs the two exchanges in reverse through autograd. Expert
gradients then equal those of the single-process layer on all ranks' tokens
together. Routing gradients cover only the rank's own tokens, so sum them over
the ranks (``DistributedDataParallel`` or an all-reduce) as for any replicated
parameter. The capacity limit, when set, counts each rank's own tokens, and
``aux`` contains the routing of the rank's own tokens.

The collectives are those of ``torch.distributed``: NCCL on GPUs, Gloo on the
CPU (Gloo implements ``all_to_all`` for CPU tensors). A backend without
``all_to_all`` raises an error from ``torch.distributed`` on the first call.
With such a backend, keep the layer unsharded (``InhibitedMoE``) and wrap the
model in ``DistributedDataParallel`` instead.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from . import torch_backend
from .dispatch import gather_tokens, plan_dispatch, scatter_pairs
from .layer import InhibitedMoE
from .outputs import MoEAux
from .reference import auxiliary_losses, scores_from_logits

_EXPERT_PARAMETERS = ("expert_up", "expert_down", "expert_up_bias", "expert_down_bias")


def _all_to_all(tensor: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` with uneven splits along the first dimension.

    Uses the functional collective of PyTorch 2.3 and newer, and the older
    ``torch.distributed.nn.functional.all_to_all_single`` where that is missing.
    """
    group = dist.group.WORLD if group is None else group
    try:
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
    except ImportError:
        # NOTE: only the functional-collective branch is covered by the tests (PyTorch 2.14).
        from torch.distributed.nn.functional import all_to_all_single

        output = tensor.new_empty((sum(output_splits),) + tuple(tensor.shape[1:]))
        return all_to_all_single(output, tensor.contiguous(), output_splits, input_splits, group)
    return wait_tensor(all_to_all_single_autograd(tensor.contiguous(), output_splits, input_splits, group))


class _LocalExperts(nn.Module):
    """The expert parameters of one rank, with the config that the expert kernels read."""

    def __init__(self, layer: InhibitedMoE, first: int, count: int):
        super().__init__()
        self.config = dataclasses.replace(layer.config, num_experts=count, top_k=1, inhibition="none",
                                          dropout_p=None, gate_rank=None, context_dims=(), capacity_factor=None)
        for name in _EXPERT_PARAMETERS:
            tensor = getattr(layer, name)
            value = None if tensor is None else nn.Parameter(tensor.detach()[first:first + count].clone())
            setattr(self, name, value)


class ExpertParallelMoE(nn.Module):
    """An :class:`InhibitedMoE` whose experts are split over the ranks of ``group``.

    Build it on every rank from the same full layer, for example after loading
    one ``state_dict`` on every rank. Each rank keeps its own slice of the experts. Call it on each rank's own tokens, with the same
    number of calls on every rank. ``num_experts`` must be a multiple of the
    group size.
    """

    def __init__(self, layer: InhibitedMoE, group=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialised; call init_process_group first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        cfg = layer.config
        if cfg.num_experts % self.world_size:
            raise ValueError(
                f"num_experts={cfg.num_experts} is not a multiple of the group size {self.world_size}; "
                "expert parallelism gives every rank the same number of experts"
            )
        self.experts_per_rank = cfg.num_experts // self.world_size
        self.first_expert = self.rank * self.experts_per_rank
        self.experts = _LocalExperts(layer, self.first_expert, self.experts_per_rank)
        # The routing module keeps every parameter except the experts, which live in self.experts.
        self.routing = InhibitedMoE(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k, backend="torch",
                                    device=layer.router_weight.device, dtype=layer.router_weight.dtype,
                                    **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                       if f.name not in ("dim", "hidden_dim", "num_experts", "top_k")})
        for name in _EXPERT_PARAMETERS:
            delattr(self.routing, name)
        routing_state = {k: v for k, v in layer.state_dict().items() if k.split(".")[0] not in _EXPERT_PARAMETERS}
        self.routing.load_state_dict(routing_state)
        self.aux = None

    @property
    def config(self):
        """Options of the layer (those of the full, unsharded layer)."""
        return self.routing.config

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Run the layer on this rank's tokens ``x [..., D]``; return ``[..., D]``."""
        y = self.routing.run(self._forward_tokens, x, context)
        self.aux = self.routing.aux
        return y

    def _forward_tokens(self, routing_layer: InhibitedMoE, tokens: torch.Tensor, sources):
        cfg = routing_layer.config
        num_tokens, k, world = tokens.shape[0], cfg.top_k, self.world_size

        routing = torch_backend.route(routing_layer, tokens, sources)
        expert_input = routing.gated_input if cfg.inhibit_experts else tokens
        plan = plan_dispatch(routing.ids, cfg.num_experts, cfg.capacity(num_tokens), max_padding=0.0)
        send_rows = gather_tokens(expert_input, plan, k)  # grouped by expert, hence by owning rank

        # Exchange the per-expert counts, then the rows: rank s receives, from every rank r,
        # the rows of r's tokens routed to s's experts, ordered by r and then by expert.
        send_counts = plan.kept_counts.view(world, self.experts_per_rank)
        recv_counts = _all_to_all(send_counts.contiguous(), [1] * world, [1] * world, self.group)
        send_splits = send_counts.sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        received = _all_to_all(send_rows, recv_splits, send_splits, self.group)

        # Regroup the received rows by local expert, run the experts, and restore the order.
        by_expert = _rows_by_expert(recv_counts)
        local_counts = recv_counts.sum(dim=0)
        local_rows = received.index_select(0, by_expert)
        outputs = torch_backend.run_experts(self.experts, local_rows, "grouped", local_counts)
        restored = torch.empty_like(by_expert)
        restored[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        returned = _all_to_all(outputs.index_select(0, restored), send_splits, recv_splits, self.group)

        pair_out = scatter_pairs(returned, plan).view(num_tokens, k, cfg.dim)
        weights = routing.weights
        slot_weights = weights if plan.all_kept else torch.where(plan.kept, weights, torch.zeros_like(weights))
        y = (pair_out.to(routing.logits.dtype) * slot_weights.unsqueeze(-1)).sum(dim=1)

        scores = routing.scores if routing.scores is not None else scores_from_logits(cfg, routing.logits)
        load_balance, z_loss, loss = auxiliary_losses(cfg, routing.logits, scores, plan.counts)
        aux = MoEAux(routing.logits, routing.ids, weights, plan.counts, plan.kept, load_balance, z_loss, loss)
        return y.to(tokens.dtype), aux


def _rows_by_expert(recv_counts: torch.Tensor) -> torch.Tensor:
    """Return the permutation that orders rows received as (source rank, expert) blocks by (expert, source)."""
    world, experts = recv_counts.shape
    flat = recv_counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # start of block (s, e) in the received order
    order = starts.view(world, experts).t().reshape(-1)
    lengths = recv_counts.t().reshape(-1)
    # Row i of block b is at starts[b] + i: repeat each block's start and add the offsets within it.
    block_starts = torch.repeat_interleave(order, lengths)
    block_offsets = torch.arange(int(lengths.sum()), device=recv_counts.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    return block_starts + block_offsets
