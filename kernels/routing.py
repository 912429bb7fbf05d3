"""Fused Triton routing of the inhibited MoE layer: forward, dispatch metadata and backward.

For a tile of ``BLOCK_M`` tokens of ``x [N, D]`` the forward kernel computes

    a = x W_g^T + b_g + context term        (low-rank gate: a = (x V^T) U^T + b_g)
    m = sigmoid(a),  u = x * m
    z = u W_r^T + b_r                       (router logits, float32)
    s = softmax(z) or sigmoid(z)
    ids = the top_k largest scores per token (ties to the lower expert index, NaN counted as the largest)
    weights = the chosen scores, divided by their sum when renormalising
    plus the expert histogram of the tile.

The gate works on one chunk of ``BLOCK_D`` features at a time and each chunk of
``u`` feeds the router matmul at once, so ``u`` never reaches memory. The
context term is either a ready ``[N, D]`` tensor or ``context [N, C]``
projected by ``context_weight [D, C]`` inside the kernel.

The dispatch kernel turns the per-tile histograms into the positions of the
``N * k`` (token, slot) pairs grouped by expert, stable in token order, with no
host synchronisation.

The backward recomputes the gate from ``x`` instead of keeping ``[N, D]``
tensors from the forward: only the logits ``[N, E]``, ids and weights
``[N, k]`` are saved. A token-tile kernel computes the logit gradient and the
gate gradients; the weight gradients are matrix products computed by one
program per output tile that loops over all tokens, so they hold the same bits
from run to run (no atomics).

Limits: ``num_experts <= MAX_EXPERTS`` and a low-rank gate of rank
``<= MAX_GATE_RANK``, because the logits and the low-rank projection of a tile
live in registers. Inputs are float32, bfloat16 or float16. All routing math
runs in float32. Element offsets are int64.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels
on CPU tensors through the Triton interpreter.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, check_device, check_tensor, dot, dot_precision

MAX_EXPERTS = 1024
MAX_GATE_RANK = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Gate modes of the kernels.
GATE_NONE, GATE_FULL, GATE_LOW_RANK = 0, 1, 2
# Context modes: no context, a ready [N, D] term, or context [N, C] @ context_weight[D, C]^T.
CONTEXT_NONE, CONTEXT_TERM, CONTEXT_PROJECTED = 0, 1, 2

# Keys of the top-k search: every real score maps to an int32 key above both.
_REMOVED_KEY = -2147483647
_PADDING_KEY = -2147483646


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _low_rank_input(
    x_ptr, gate_v_ptr,
    rows, row_mask, D, R,
    stride_x_row, stride_gv_row,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Return ``t = x V^T`` for the rows of one tile, ``[BLOCK_M, BLOCK_R]`` float32."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        x_tile = tl.load(x_ptr + rows[:, None] * stride_x_row + offs_k[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # V^T tile [BLOCK_K, BLOCK_R] read from V [R, D].
        v_tile = tl.load(gate_v_ptr + offs_r[None, :].to(tl.int64) * stride_gv_row + offs_k[:, None],
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        t = dot(x_tile, v_tile, t, DOT_PRECISION, UPCAST_DOT)
    return t


@triton.jit
def _accumulate_linear(acc, a_ptr, w_ptr, rows, row_mask, cols, col_mask, K, stride_a_row, stride_w_row,
                       BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Add ``a[rows, :K] @ w[cols, :K]^T`` to ``acc``, reading ``K`` in chunks of ``BLOCK_K``.

    ``w`` has the ``nn.Linear`` layout ``[out, in]``, so its transposed tile is read directly.
    """
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_tile = tl.load(a_ptr + rows[:, None] * stride_a_row + offs_k[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptr + cols[None, :] * stride_w_row + offs_k[:, None],
                         mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(a_tile, w_tile, acc, DOT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _gate_pre_activation(
    x_ptr, gate_w_ptr, gate_u_ptr, gate_b_ptr, ctx_ptr, ctx_w_ptr, t,
    rows, row_mask, offs_d, d_mask, D, R, C,
    stride_x_row, stride_gw_row, stride_gu_row, stride_ctx_row, stride_cw_row,
    GATE_MODE: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, CONTEXT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Return the gate pre-activation ``a[rows, offs_d]`` in float32.

    ``t`` is ``x V^T`` in the input dtype for the low-rank gate (unused otherwise).
    """
    cols = offs_d.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if GATE_MODE == 1:
        acc = _accumulate_linear(acc, x_ptr, gate_w_ptr, rows, row_mask, cols, d_mask, D, stride_x_row,
                                 stride_gw_row, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    else:
        offs_r = tl.arange(0, BLOCK_R)
        # U^T tile [BLOCK_R, BLOCK_D] read from U [D, R].
        u_tile = tl.load(gate_u_ptr + cols[None, :] * stride_gu_row + offs_r[:, None],
                         mask=(offs_r[:, None] < R) & d_mask[None, :], other=0.0)
        acc = dot(t, u_tile, acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_GATE_BIAS:
        acc += tl.load(gate_b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if CONTEXT_MODE == 1:
        acc += tl.load(ctx_ptr + rows[:, None] * stride_ctx_row + offs_d[None, :],
                       mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    elif CONTEXT_MODE == 2:
        acc = _accumulate_linear(acc, ctx_ptr, ctx_w_ptr, rows, row_mask, cols, d_mask, C, stride_ctx_row,
                                 stride_cw_row, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _normalized_sigmoid(z):
    """Return ``sigmoid(z) / sum(sigmoid(z))`` per row as a softmax of log-sigmoids; ``-inf`` columns get 0.

    Dividing the sigmoids themselves gives 0 / 0 once every sigmoid of a row
    rounds to zero (logits below about -88).
    """
    log_sigmoid = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))
    p = tl.exp(log_sigmoid - tl.max(log_sigmoid, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _scores(z, e_mask, SOFTMAX: tl.constexpr):
    """Return the router scores of logits ``z [BLOCK_M, BLOCK_E]``; padding columns get 0."""
    if SOFTMAX:
        z = tl.where(e_mask[None, :], z, float("-inf"))
        z_max = tl.max(z, axis=1)
        p = tl.exp(z - z_max[:, None])
        p = tl.where(e_mask[None, :], p, 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        s = tl.where(e_mask[None, :], s, 0.0)
    return s


@triton.jit
def _route_forward_kernel(
    # pointers
    x_ptr, gate_w_ptr, gate_u_ptr, gate_v_ptr, gate_b_ptr, ctx_ptr, ctx_w_ptr, router_w_ptr, router_b_ptr,
    logits_ptr, ids_ptr, weights_ptr, tile_counts_ptr,
    # sizes
    N, D, E, R, C, TOP_K,
    # strides (the last dimension of every input has stride 1)
    stride_x_row, stride_gw_row, stride_gu_row, stride_gv_row, stride_ctx_row, stride_cw_row, stride_rw_row,
    # compile-time constants
    GATE_MODE: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, CONTEXT_MODE: tl.constexpr,
    HAS_ROUTER_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_TOP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Route one tile of tokens: gate, logits, scores, top-k, weights and the tile's expert histogram."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    dtype = x_ptr.dtype.element_ty

    t = 0.0
    if GATE_MODE == 2:
        t = _low_rank_input(x_ptr, gate_v_ptr, rows, row_mask, D, R, stride_x_row, stride_gv_row,
                            BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION, UPCAST_DOT).to(dtype)

    # Router logits, one chunk of features at a time; the chunk of u stays in registers.
    z = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x_chunk = tl.load(x_ptr + rows[:, None] * stride_x_row + offs_d[None, :],
                          mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if GATE_MODE == 0:
            u = x_chunk
        else:
            a = _gate_pre_activation(
                x_ptr, gate_w_ptr, gate_u_ptr, gate_b_ptr, ctx_ptr, ctx_w_ptr, t,
                rows, row_mask, offs_d, d_mask, D, R, C,
                stride_x_row, stride_gw_row, stride_gu_row, stride_ctx_row, stride_cw_row,
                GATE_MODE, HAS_GATE_BIAS, CONTEXT_MODE, BLOCK_M, BLOCK_D, BLOCK_K, BLOCK_R,
                DOT_PRECISION, UPCAST_DOT)
            # Rounded to the input dtype once, as the reference layer's u is.
            u = (x_chunk.to(tl.float32) * tl.sigmoid(a)).to(dtype)
        # W_r^T tile [BLOCK_D, BLOCK_E] read from W_r [E, D].
        w_tile = tl.load(router_w_ptr + offs_e[None, :].to(tl.int64) * stride_rw_row + offs_d[:, None],
                         mask=d_mask[:, None] & e_mask[None, :], other=0.0)
        z = dot(u, w_tile, z, DOT_PRECISION, UPCAST_DOT)
    if HAS_ROUTER_BIAS:
        z += tl.load(router_b_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & e_mask[None, :]
    tl.store(logits_ptr + rows[:, None] * E + offs_e[None, :], z, mask=out_mask)

    s = _scores(z, e_mask, SOFTMAX)

    # Top-k on int32 keys that order like the scores. The bits of a float map
    # to a signed integer of the same order and NaN to the largest key. Padding
    # columns and chosen experts get keys below every real score.
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(s != s, 2147483647, key)
    key = tl.where(e_mask[None, :], key, _PADDING_KEY)
    slots = tl.arange(0, BLOCK_TOP_K)
    ids = tl.zeros((BLOCK_M, BLOCK_TOP_K), dtype=tl.int32)
    weights = tl.zeros((BLOCK_M, BLOCK_TOP_K), dtype=tl.float32)
    chosen_logits = tl.full((BLOCK_M, BLOCK_TOP_K), float("-inf"), dtype=tl.float32)
    histogram = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for j in range(TOP_K):
        best = tl.max(key, axis=1)
        # Among equal keys, the lowest expert index wins.
        choice = tl.min(tl.where(key == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        chosen = offs_e[None, :] == choice[:, None]
        score = tl.sum(tl.where(chosen, s, 0.0), axis=1)
        ids = tl.where(slots[None, :] == j, choice[:, None], ids)
        weights = tl.where(slots[None, :] == j, score[:, None], weights)
        if RENORMALIZE and not SOFTMAX:
            logit = tl.sum(tl.where(chosen, z, 0.0), axis=1)
            chosen_logits = tl.where(slots[None, :] == j, logit[:, None], chosen_logits)
        histogram += tl.sum((chosen & row_mask[:, None]).to(tl.int32), axis=0)
        key = tl.where(chosen, _REMOVED_KEY, key)
    if RENORMALIZE:
        if SOFTMAX:
            weights = weights / tl.sum(weights, axis=1)[:, None]
        else:
            weights = _normalized_sigmoid(chosen_logits)
    slot_mask = row_mask[:, None] & (slots[None, :] < TOP_K)
    tl.store(ids_ptr + rows[:, None] * TOP_K + slots[None, :], ids.to(tl.int64), mask=slot_mask)
    tl.store(weights_ptr + rows[:, None] * TOP_K + slots[None, :], weights, mask=slot_mask)
    tl.store(tile_counts_ptr + pid.to(tl.int64) * E + offs_e, histogram, mask=e_mask)


@triton.jit
def _dispatch_kernel(
    # pointers
    ids_ptr, tile_starts_ptr, order_ptr,
    # sizes
    num_pairs, E, PAIRS_PER_TILE,
    # compile-time constants
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Write the pairs of one routing tile to their positions in ``order``.

    ``tile_starts[tile, e]`` is the position of the tile's first pair routed to
    expert ``e``. Pairs are visited in pair order, so each expert's pairs stay
    in token order.
    """
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    next_position = tl.load(tile_starts_ptr + pid.to(tl.int64) * E + offs_e, mask=e_mask, other=0)
    first_pair = pid.to(tl.int64) * PAIRS_PER_TILE
    offs_p = tl.arange(0, BLOCK_P)
    for p0 in range(0, PAIRS_PER_TILE, BLOCK_P):
        pairs = first_pair + p0 + offs_p
        p_mask = (p0 + offs_p < PAIRS_PER_TILE) & (pairs < num_pairs)
        # Masked pairs get expert -1, which matches no column.
        expert = tl.load(ids_ptr + pairs, mask=p_mask, other=-1).to(tl.int32)
        one_hot = expert[:, None] == offs_e[None, :]
        # Rank of each pair among the earlier pairs of this chunk with the same expert.
        earlier_same = (expert[:, None] == expert[None, :]) & (offs_p[None, :] < offs_p[:, None])
        rank = tl.sum(earlier_same.to(tl.int64), axis=1)
        base = tl.sum(tl.where(one_hot, next_position[None, :], 0), axis=1)
        tl.store(order_ptr + base + rank, pairs, mask=p_mask)
        next_position += tl.sum(one_hot.to(tl.int64), axis=0)


@triton.jit
def _route_backward_token_kernel(
    # pointers
    x_ptr, gate_w_ptr, gate_u_ptr, gate_v_ptr, gate_b_ptr, ctx_ptr, ctx_w_ptr, router_w_ptr,
    logits_ptr, ids_ptr, grad_weights_ptr, grad_logits_ptr,
    grad_z_ptr, grad_x_ptr, grad_a_ptr, u_ptr, t_ptr,
    # sizes
    N, D, E, R, C, TOP_K,
    # strides (the last dimension of every input has stride 1)
    stride_x_row, stride_gw_row, stride_gu_row, stride_gv_row, stride_ctx_row, stride_cw_row, stride_rw_row,
    stride_gwt_row, stride_gl_row,
    # compile-time constants
    GATE_MODE: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, CONTEXT_MODE: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr, STORE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_TOP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Backward of one tile of tokens up to the gate.

    Writes the logit gradient ``dz [N, E]`` and the direct part of the
    gradient of ``x`` (``du * m``, or ``du`` without a gate). With a gate it
    also writes the gradient ``da [N, D]`` of the gate pre-activation and, for
    the weight gradients, ``u`` (when ``STORE_U``) and ``t = x V^T``. All are
    float32 except ``u``, which has the input dtype.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    out_mask = row_mask[:, None] & e_mask[None, :]
    dtype = x_ptr.dtype.element_ty

    z = tl.load(logits_ptr + rows[:, None] * E + offs_e[None, :], mask=out_mask, other=0.0)
    s = _scores(z, e_mask, SOFTMAX)

    # Gradient of the scores from the weight gradients, scattered to the chosen experts.
    grad_s = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    if HAS_GRAD_WEIGHTS:
        slots = tl.arange(0, BLOCK_TOP_K)
        slot_mask = row_mask[:, None] & (slots[None, :] < TOP_K)
        ids = tl.load(ids_ptr + rows[:, None] * TOP_K + slots[None, :], mask=slot_mask, other=-1).to(tl.int32)
        g = tl.load(grad_weights_ptr + rows[:, None] * stride_gwt_row + slots[None, :], mask=slot_mask, other=0.0)
        g = g.to(tl.float32)
        chosen = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.int1)
        for j in range(TOP_K):
            id_j = tl.sum(tl.where(slots[None, :] == j, ids, 0), axis=1)
            g_j = tl.sum(tl.where(slots[None, :] == j, g, 0.0), axis=1)
            hit = offs_e[None, :] == id_j[:, None]
            grad_s = tl.where(hit, g_j[:, None], grad_s)
            chosen = chosen | hit
        if RENORMALIZE and SOFTMAX:
            # w_j = s_j / S with S the sum of the chosen scores:
            # dL/ds_j = (g_j - sum_i g_i w_i) / S.
            total = tl.sum(tl.where(chosen, s, 0.0), axis=1)
            # Rows past N choose nothing; 1 keeps them free of 0 / 0.
            total = tl.where(row_mask, total, 1.0)
            weighted = tl.sum(tl.where(chosen, grad_s * s, 0.0), axis=1) / total
            grad_s = tl.where(chosen, (grad_s - weighted[:, None]) / total[:, None], 0.0)
        if RENORMALIZE and not SOFTMAX:
            # w = softmax over the chosen experts of log(sigmoid(z)), so grad_s becomes
            # dL/dlog(s_j) = w_j (g_j - sum_i g_i w_i); rows past N choose nothing.
            w = tl.where(chosen, _normalized_sigmoid(tl.where(chosen, z, float("-inf"))), 0.0)
            weighted = tl.sum(tl.where(chosen, grad_s * w, 0.0), axis=1)
            grad_s = tl.where(chosen, w * (grad_s - weighted[:, None]), 0.0)
    if SOFTMAX:
        grad_z = s * (grad_s - tl.sum(grad_s * s, axis=1)[:, None])
    elif RENORMALIZE:
        grad_z = grad_s * (1.0 - s)  # d log(sigmoid(z)) / dz = 1 - sigmoid(z)
    else:
        grad_z = grad_s * s * (1.0 - s)
    if HAS_GRAD_LOGITS:
        grad_z += tl.load(grad_logits_ptr + rows[:, None] * stride_gl_row + offs_e[None, :],
                          mask=out_mask, other=0.0).to(tl.float32)
    grad_z = tl.where(out_mask, grad_z, 0.0)
    tl.store(grad_z_ptr + rows[:, None] * E + offs_e[None, :], grad_z, mask=out_mask)

    t = 0.0
    if GATE_MODE == 2:
        t = _low_rank_input(x_ptr, gate_v_ptr, rows, row_mask, D, R, stride_x_row, stride_gv_row,
                            BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION, UPCAST_DOT)
        offs_r = tl.arange(0, BLOCK_R)
        tl.store(t_ptr + rows[:, None] * R + offs_r[None, :], t,
                 mask=row_mask[:, None] & (offs_r[None, :] < R))
        t = t.to(dtype)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        chunk_mask = row_mask[:, None] & d_mask[None, :]
        # du = dz W_r for this chunk, in float32.
        w_tile = tl.load(router_w_ptr + offs_e[:, None].to(tl.int64) * stride_rw_row + offs_d[None, :],
                         mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        grad_u = tl.dot(grad_z, w_tile, input_precision="ieee")
        chunk = rows[:, None] * D + offs_d[None, :]
        if GATE_MODE == 0:
            tl.store(grad_x_ptr + chunk, grad_u, mask=chunk_mask)
        else:
            x_chunk = tl.load(x_ptr + rows[:, None] * stride_x_row + offs_d[None, :],
                              mask=chunk_mask, other=0.0)
            a = _gate_pre_activation(
                x_ptr, gate_w_ptr, gate_u_ptr, gate_b_ptr, ctx_ptr, ctx_w_ptr, t,
                rows, row_mask, offs_d, d_mask, D, R, C,
                stride_x_row, stride_gw_row, stride_gu_row, stride_ctx_row, stride_cw_row,
                GATE_MODE, HAS_GATE_BIAS, CONTEXT_MODE, BLOCK_M, BLOCK_D, BLOCK_K, BLOCK_R,
                DOT_PRECISION, UPCAST_DOT)
            m = tl.sigmoid(a)
            x_f32 = x_chunk.to(tl.float32)
            if STORE_U:
                tl.store(u_ptr + chunk, (x_f32 * m).to(dtype), mask=chunk_mask)
            # x reaches u twice: directly (du * m) and through the gate (da = du * x * m * (1 - m)).
            tl.store(grad_x_ptr + chunk, grad_u * m, mask=chunk_mask)
            tl.store(grad_a_ptr + chunk, grad_u * x_f32 * m * (1.0 - m), mask=chunk_mask)


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # compile-time constants
    ACCUMULATE: tl.constexpr, FLOAT32_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """``c (+)= a @ b`` with float32 accumulation, one program per ``[BLOCK_M, BLOCK_N]`` tile of ``c``.

    Each program runs over all of ``K`` in a fixed order, so the result has the
    same bits from run to run. ``a`` is cast to the dtype of ``b`` unless
    ``FLOAT32_OPERANDS`` casts both to float32.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FLOAT32_OPERANDS:
            acc = dot(a.to(tl.float32), b.to(tl.float32), acc, "ieee", UPCAST_DOT)
        else:
            acc = dot(a.to(b.dtype), b, acc, DOT_PRECISION, UPCAST_DOT)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)




# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


class ForwardResult(NamedTuple):
    """Outputs of :func:`route_forward` (``N`` tokens, ``E`` experts, ``k`` per token)."""

    logits: torch.Tensor  # [N, E] float32
    ids: torch.Tensor  # [N, k] int64
    weights: torch.Tensor  # [N, k] float32
    tile_counts: torch.Tensor  # [num_tiles, E] int32, expert histogram of each tile of block_m tokens
    block_m: int


class BackwardResult(NamedTuple):
    """Gradients computed by :func:`route_backward`; ``None`` for an input that was not given."""

    x: torch.Tensor
    router_weight: torch.Tensor
    router_bias: Optional[torch.Tensor]
    gate_weight: Optional[torch.Tensor]
    gate_u: Optional[torch.Tensor]
    gate_v: Optional[torch.Tensor]
    gate_bias: Optional[torch.Tensor]
    context: Optional[torch.Tensor]
    context_weight: Optional[torch.Tensor]


def _block_sizes(num_experts: int, top_k: int, rank: int):
    block_e = max(16, triton.next_power_of_2(num_experts))
    # The [BLOCK_M, BLOCK_E] logits tile stays in registers: fewer tokens per tile for many experts.
    if block_e <= 64:
        block_m = 64
    elif block_e <= 256:
        block_m = 32
    else:
        block_m = 16
    # The router weight tile [BLOCK_D, BLOCK_E] feeds tl.dot through shared memory: at most 16K elements.
    block_d = max(16, min(64, 16384 // block_e))
    block_r = max(16, triton.next_power_of_2(rank)) if rank else 16
    # NOTE: these sizes are chosen by hand, not tuned on a GPU; expert counts above 256 were run only
    # through the interpreter.
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=32, BLOCK_E=block_e, BLOCK_R=block_r,
                BLOCK_TOP_K=triton.next_power_of_2(top_k))


def _gate_mode(gate_weight, gate_u) -> int:
    if gate_weight is not None:
        return GATE_FULL
    return GATE_LOW_RANK if gate_u is not None else GATE_NONE


def _context_mode(context, context_weight) -> int:
    if context is None:
        return CONTEXT_NONE
    return CONTEXT_TERM if context_weight is None else CONTEXT_PROJECTED


def check_route_inputs(x, router_weight, router_bias, top_k, gate_weight, gate_u, gate_v, gate_bias,
                       context, context_weight) -> None:
    """Validate the inputs of :func:`route_forward`; raise with the argument name and value."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [N, D]")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the Triton routing kernels support float32, bfloat16 and float16")
    check_device("x", x)
    num_tokens, dim = x.shape
    dtype, device = x.dtype, x.device
    check_tensor("x", x, (num_tokens, dim), dtype, device)
    check_tensor("router_weight", router_weight, (None, dim), dtype, device)
    num_experts = router_weight.shape[0]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(
            f"router_weight has {num_experts} rows (experts); the fused routing kernel supports 1 to {MAX_EXPERTS}"
        )
    if router_bias is not None:
        check_tensor("router_bias", router_bias, (num_experts,), dtype, device)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k={top_k!r} is invalid; expected an integer")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is out of range for num_experts={num_experts}; expected 1 <= top_k <= num_experts")
    if gate_weight is not None and (gate_u is not None or gate_v is not None):
        raise ValueError("gate_weight and gate_u/gate_v were both given; pass a full gate or a low-rank gate, not both")
    if (gate_u is None) != (gate_v is None):
        raise ValueError("a low-rank gate needs both gate_u [D, r] and gate_v [r, D]; one of them is missing")
    has_gate = gate_weight is not None or gate_u is not None
    if gate_weight is not None:
        check_tensor("gate_weight", gate_weight, (dim, dim), dtype, device)
    if gate_u is not None:
        check_tensor("gate_u", gate_u, (dim, None), dtype, device)
        rank = gate_u.shape[1]
        check_tensor("gate_v", gate_v, (rank, dim), dtype, device)
        if not 1 <= rank <= MAX_GATE_RANK:
            raise ValueError(f"gate_u has rank {rank}; the fused routing kernel supports ranks 1 to {MAX_GATE_RANK}")
    if gate_bias is not None:
        if not has_gate:
            raise ValueError("gate_bias was given without gate_weight or gate_u/gate_v")
        check_tensor("gate_bias", gate_bias, (dim,), dtype, device)
    if context is not None:
        if not has_gate:
            raise ValueError("context was given without gate_weight or gate_u/gate_v; the context term feeds the gate")
        if context_weight is None:
            check_tensor("context", context, (num_tokens, dim), dtype, device)
        else:
            check_tensor("context", context, (num_tokens, None), dtype, device)
            check_tensor("context_weight", context_weight, (dim, context.shape[1]), dtype, device)
    elif context_weight is not None:
        raise ValueError("context_weight was given without context")


def route_forward(x, router_weight, router_bias=None, *, top_k: int, softmax: bool = True, renormalize: bool = True,
                  gate_weight=None, gate_u=None, gate_v=None, gate_bias=None, context=None,
                  context_weight=None) -> ForwardResult:
    """Launch the fused routing forward kernel on tokens ``x [N, D]``.

    Args:
        x: tokens ``[N, D]``, float32, bfloat16 or float16 (every other tensor in the same dtype).
        router_weight: ``W_r [E, D]``; router_bias: ``b_r [E]`` or ``None``.
        top_k: experts per token, ``1 <= top_k <= E``.
        softmax: softmax scores when True, sigmoid scores otherwise.
        renormalize: divide the chosen scores by their sum.
        gate_weight: full gate ``W_g [D, D]``; or gate_u ``U [D, r]`` with gate_v ``V [r, D]``
            for ``W_g = U V``; none of them: no gate (``u = x``).
        gate_bias: ``b_g [D]`` or ``None``.
        context: a term ``[N, D]`` added to the gate pre-activation, or, with
            ``context_weight [D, C]``, a matrix ``[N, C]`` whose projection
            ``context @ context_weight^T`` is added.

    Matmuls accumulate in float32. With float32 inputs ``tl.dot`` runs with
    ``input_precision="ieee"`` (no tf32), so the GPU and the interpreter compute
    the same function; 16-bit inputs use the tensor cores with float32
    accumulation. ``u`` is rounded to the input dtype before the router matmul,
    as the reference layer rounds it.

    Raises:
        TypeError, ValueError: an input has the wrong type, shape, dtype, device or strides.
        RuntimeError: the tensors are on the CPU and the interpreter is off.
    """
    check_route_inputs(x, router_weight, router_bias, top_k, gate_weight, gate_u, gate_v, gate_bias,
                       context, context_weight)
    num_tokens, dim = x.shape
    num_experts = router_weight.shape[0]
    rank = gate_u.shape[1] if gate_u is not None else 0
    blocks = _block_sizes(num_experts, top_k, rank)
    block_m = blocks["BLOCK_M"]
    num_tiles = triton.cdiv(num_tokens, block_m)
    logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    tile_counts = torch.zeros(num_tiles, num_experts, dtype=torch.int32, device=x.device)
    if num_tokens == 0:
        return ForwardResult(logits, ids, weights, tile_counts, block_m)

    context_mode = _context_mode(context, context_weight)
    _route_forward_kernel[(num_tiles,)](
        x, gate_weight, gate_u, gate_v, gate_bias, context, context_weight, router_weight, router_bias,
        logits, ids, weights, tile_counts,
        num_tokens, dim, num_experts, rank, context.shape[1] if context is not None else 0, top_k,
        x.stride(0), _row_stride(gate_weight), _row_stride(gate_u), _row_stride(gate_v), _row_stride(context),
        _row_stride(context_weight), router_weight.stride(0),
        GATE_MODE=_gate_mode(gate_weight, gate_u), HAS_GATE_BIAS=gate_bias is not None, CONTEXT_MODE=context_mode,
        HAS_ROUTER_BIAS=router_bias is not None, SOFTMAX=bool(softmax), RENORMALIZE=bool(renormalize),
        DOT_PRECISION=dot_precision(x.dtype), UPCAST_DOT=INTERPRETED, **blocks,
    )
    return ForwardResult(logits, ids, weights, tile_counts, block_m)


def _row_stride(tensor) -> int:
    return 0 if tensor is None else tensor.stride(0)


def dispatch_metadata(ids: torch.Tensor, tile_counts: torch.Tensor, block_m: int):
    """Group the ``N * k`` (token, slot) pairs of ``ids [N, k]`` by expert, stable in token order.

    ``tile_counts [num_tiles, E]`` is the per-tile expert histogram of
    :func:`route_forward` computed with tiles of ``block_m`` tokens. Returns
    ``(counts [E], offsets [E + 1], order [N * k])``, all int64: ``order`` lists
    pair numbers ``t * k + j``, expert ``e`` owning ``order[offsets[e]:offsets[e + 1]]``.
    Runs on the device with no host synchronisation.
    """
    num_tokens, top_k = ids.shape
    num_tiles, num_experts = tile_counts.shape
    if num_tiles != triton.cdiv(num_tokens, block_m):
        raise ValueError(
            f"tile_counts has {num_tiles} rows; expected ceil(N / block_m) = {triton.cdiv(num_tokens, block_m)} "
            f"for N={num_tokens}, block_m={block_m}"
        )
    tile_counts = tile_counts.to(torch.int64)
    counts = tile_counts.sum(dim=0)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    order = torch.empty(num_tokens * top_k, dtype=torch.int64, device=ids.device)
    if num_tokens == 0:
        return counts, offsets, order
    tile_starts = (torch.cumsum(tile_counts, dim=0) - tile_counts + offsets[:-1]).contiguous()
    _dispatch_kernel[(num_tiles,)](
        ids.contiguous(), tile_starts, order, num_tokens * top_k, num_experts, block_m * top_k,
        BLOCK_P=64, BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
    )
    return counts, offsets, order


def matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None, *, accumulate: bool = False,
           float32_operands: bool = False) -> torch.Tensor:
    """Compute ``out (+)= a @ b`` for 2-D ``a [M, K]`` and ``b [K, N]`` of any strides, deterministically.

    ``a`` is cast to the dtype of ``b`` (float32 when ``float32_operands``) and
    products accumulate in float32; float32 operands use ``input_precision="ieee"``.
    ``out`` defaults to a new float32 ``[M, N]`` tensor.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul needs a [M, K] and b [K, N]; got a {tuple(a.shape)} and b {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out")
        out = torch.empty(M, N, dtype=torch.float32, device=a.device)
    elif tuple(out.shape) != (M, N):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected [{M}, {N}]")
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
        return out
    dot_dtype = torch.float32 if float32_operands else b.dtype
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 64))
    _matmul_kernel[grid](
        a, b, out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, FLOAT32_OPERANDS=float32_operands, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32,
        DOT_PRECISION=dot_precision(dot_dtype), UPCAST_DOT=INTERPRETED,
    )
    return out


def route_backward(x, router_weight, router_bias, gate_weight, gate_u, gate_v, gate_bias, context, context_weight,
                   logits, ids, *, softmax: bool, renormalize: bool, grad_weights=None, grad_logits=None,
                   needs_input_grad=None) -> BackwardResult:
    """Compute the gradients of the routing inputs from the gradients of ``weights`` and ``logits``.

    The inputs are those of :func:`route_forward` plus its ``logits`` and
    ``ids``. The gate is recomputed from ``x``. ``grad_weights [N, k]`` and
    ``grad_logits [N, E]`` may be ``None`` (zero). ``needs_input_grad`` is the
    tuple of flags of ``(x, router_weight, router_bias, gate_weight, gate_u,
    gate_v, gate_bias, context, context_weight)``; gradients not needed are
    returned as ``None``. Gradients have the dtype of their input.
    """
    num_tokens, dim = x.shape
    num_experts, top_k = logits.shape[1], ids.shape[1]
    if needs_input_grad is None:
        needs_input_grad = (True,) * 9
    need = dict(zip(("x", "router_weight", "router_bias", "gate_weight", "gate_u", "gate_v", "gate_bias",
                     "context", "context_weight"), needs_input_grad))
    device = x.device
    gate_mode = _gate_mode(gate_weight, gate_u)
    context_mode = _context_mode(context, context_weight)
    rank = gate_u.shape[1] if gate_u is not None else 0
    f32 = dict(dtype=torch.float32, device=device)

    grad_z = torch.zeros(num_tokens, num_experts, **f32)
    grad_x = torch.zeros(num_tokens, dim, **f32)
    has_gate = gate_mode != GATE_NONE
    grad_a = torch.zeros(num_tokens, dim, **f32) if has_gate else None
    store_u = has_gate and need["router_weight"]
    u = torch.empty(num_tokens, dim, dtype=x.dtype, device=device) if store_u else None
    t = torch.empty(num_tokens, rank, **f32) if gate_mode == GATE_LOW_RANK else None
    if grad_weights is not None:
        check_tensor("grad_weights", grad_weights, (num_tokens, top_k), grad_weights.dtype, device)
    if grad_logits is not None:
        check_tensor("grad_logits", grad_logits, (num_tokens, num_experts), grad_logits.dtype, device)

    if num_tokens > 0:
        blocks = _block_sizes(num_experts, top_k, rank)
        num_tiles = triton.cdiv(num_tokens, blocks["BLOCK_M"])
        _route_backward_token_kernel[(num_tiles,)](
            x, gate_weight, gate_u, gate_v, gate_bias, context, context_weight, router_weight,
            logits, ids, grad_weights, grad_logits,
            grad_z, grad_x, grad_a, u, t,
            num_tokens, dim, num_experts, rank, context.shape[1] if context is not None else 0, top_k,
            x.stride(0), _row_stride(gate_weight), _row_stride(gate_u), _row_stride(gate_v), _row_stride(context),
            _row_stride(context_weight), router_weight.stride(0),
            _row_stride(grad_weights), _row_stride(grad_logits),
            GATE_MODE=gate_mode, HAS_GATE_BIAS=gate_bias is not None, CONTEXT_MODE=context_mode,
            SOFTMAX=bool(softmax), RENORMALIZE=bool(renormalize),
            HAS_GRAD_WEIGHTS=grad_weights is not None, HAS_GRAD_LOGITS=grad_logits is not None, STORE_U=store_u,
            DOT_PRECISION=dot_precision(x.dtype), UPCAST_DOT=INTERPRETED, **blocks,
        )

    def cast(grad, like):
        return grad.to(like.dtype)

    # Router: dW_r = dz^T u (u = x without a gate), db_r = column sums of dz.
    grad_router_weight = grad_router_bias = None
    if need["router_weight"]:
        grad_router_weight = cast(matmul(grad_z.t(), u if store_u else x, float32_operands=True), router_weight)
    if router_bias is not None and need["router_bias"]:
        grad_router_bias = cast(grad_z.sum(dim=0), router_bias)

    grad_gate_weight = grad_gate_u = grad_gate_v = grad_gate_bias = grad_context = grad_context_weight = None
    if has_gate:
        if gate_mode == GATE_FULL:
            # a = x W_g^T: dx += da W_g, dW_g = da^T x.
            matmul(grad_a, gate_weight, grad_x, accumulate=True)
            if need["gate_weight"]:
                grad_gate_weight = cast(matmul(grad_a.t(), x), gate_weight)
        else:
            # a = t U^T with t = x V^T: dt = da U, dx += dt V, dU = da^T t, dV = dt^T x.
            grad_t = matmul(grad_a, gate_u)
            matmul(grad_t, gate_v, grad_x, accumulate=True)
            if need["gate_u"]:
                grad_gate_u = cast(matmul(grad_a.t(), t, float32_operands=True), gate_u)
            if need["gate_v"]:
                grad_gate_v = cast(matmul(grad_t.t(), x), gate_v)
        if gate_bias is not None and need["gate_bias"]:
            grad_gate_bias = cast(grad_a.sum(dim=0), gate_bias)
        if context_mode == CONTEXT_TERM and need["context"]:
            grad_context = cast(grad_a, context)
        elif context_mode == CONTEXT_PROJECTED:
            if need["context"]:
                grad_context = cast(matmul(grad_a, context_weight), context)
            if need["context_weight"]:
                grad_context_weight = cast(matmul(grad_a.t(), context), context_weight)
    return BackwardResult(
        cast(grad_x, x), grad_router_weight, grad_router_bias, grad_gate_weight, grad_gate_u, grad_gate_v,
        grad_gate_bias, grad_context, grad_context_weight,
    )
