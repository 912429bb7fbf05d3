"""Triton kernels of the experts and the combine, forward and backward, with their launchers.

The ``N * k`` (token, slot) pairs are grouped by expert: ``order [N * k]``
lists pair numbers ``t * k + j`` expert by expert, in token order inside each
expert, and expert ``e`` owns rows ``offsets[e] .. offsets[e] + counts[e] - 1``
of every buffer indexed by row. With a capacity, expert ``e`` keeps its first
``min(counts[e], capacity)`` rows; the kernels never read or write the other
rows. ``row_of_pair [N * k]`` contains the row of each pair, or ``-1`` for a
dropped pair.

Forward, for row ``r`` of expert ``e`` and pair ``p = order[r]`` of token ``t = p // k``:

    pre[r]    = x[t] W_up[e]^T + b_up[e]          grouped product, x rows gathered in the kernel
    hidden[r] = act(pre[r])                       in the epilogue of the same kernel
    out[r]    = hidden[r] W_down[e]^T + b_down[e]
    y[t]      = sum_j w[t, j] out[row(t, j)]      slot order, float32

Backward, with ``g[r] = w[p] * grad_y[t]`` formed while loading (never stored):

    grad_w[t, j]   = <grad_y[t], out[row(t, j)]>
    grad_pre[r]    = act'(pre[r]) * (g[r] W_down[e])       activation backward in the epilogue
    grad_W_down[e] = sum_r g[r]^T hidden[r],   grad_b_down[e] = sum_r g[r]
    grad_W_up[e]   = sum_r grad_pre[r]^T x[t], grad_b_up[e]   = sum_r grad_pre[r]
    grad_x[t]      = sum_j (grad_pre W_up[e])[row(t, j)]   slot order

Every output element is written by one program that loops over its whole
reduction in a fixed order, with no atomics. So each launch configuration
gives the same bits on every run, and a kernel run twice (as the autotuner
does) writes the same values twice. Row tiles are mapped to experts inside the
kernels from the per-expert counts, so no launch reads them on the host.
Element offsets are int64.
"""

from __future__ import annotations

import functools
import numbers
import time
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, cast_to, check_device, check_tensor, dot, dot_precision

ACTIVATIONS = ("swiglu", "gelu", "relu")

# Epilogues of _grouped_matmul_kernel.
STORE = 0  # c = acc (+ bias)
SWIGLU = 1  # pre = [gate, up] (+ bias), hidden = silu(gate) * up
GELU = 2  # pre = acc (+ bias), hidden = gelu(pre)
RELU = 3  # pre = acc (+ bias), hidden = relu(pre)
SWIGLU_BACKWARD = 4  # acc = grad of hidden; c = grad of [gate, up]
GELU_BACKWARD = 5  # acc = grad of hidden; c = grad of pre
RELU_BACKWARD = 6  # acc = grad of hidden; c = grad of pre

_FORWARD_EPILOGUE = {"swiglu": SWIGLU, "gelu": GELU, "relu": RELU}
_BACKWARD_EPILOGUE = {"swiglu": SWIGLU_BACKWARD, "gelu": GELU_BACKWARD, "relu": RELU_BACKWARD}

# Experts handled per step of the tile-to-expert search.
_BLOCK_E = 256


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _expert_of_tile(tile, counts_ptr, offsets_ptr, num_experts, capacity,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Return ``(expert, first row, rows left)`` of row tile ``tile``; ``expert == num_experts`` past the last tile.

    Expert ``e`` has ``ceil(min(counts[e], capacity) / BLOCK_M)`` tiles, numbered
    after the tiles of experts ``0 .. e-1``.
    """
    expert = tl.zeros((), dtype=tl.int64)
    tiles_before = tl.zeros((), dtype=tl.int64)  # tiles of the experts before the one found
    tiles_total = tl.zeros((), dtype=tl.int64)  # tiles of all experts of the earlier blocks
    for e0 in range(0, num_experts, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < num_experts
        kept = tl.minimum(tl.load(counts_ptr + offs_e, mask=e_mask, other=0).to(tl.int64), capacity)
        tiles = (kept + BLOCK_M - 1) // BLOCK_M
        ends = tiles_total + tl.cumsum(tiles, 0)
        before = (ends <= tile) & e_mask
        expert += tl.sum(before.to(tl.int64), 0)
        tiles_before += tl.sum(tl.where(before, tiles, 0), 0)
        tiles_total += tl.sum(tiles, 0)
    safe_expert = tl.minimum(expert, num_experts - 1)
    kept_rows = tl.minimum(tl.load(counts_ptr + safe_expert).to(tl.int64), capacity)
    done = (tile - tiles_before) * BLOCK_M
    first_row = tl.load(offsets_ptr + safe_expert) + done
    return expert, first_row, kept_rows - done


@triton.jit
def _grouped_matmul_kernel(
    # pointers
    a_ptr, b_ptr, bias_ptr, c_ptr, hidden_ptr, pre_ptr, order_ptr, scale_ptr, counts_ptr, offsets_ptr,
    # sizes
    num_experts, capacity, N_COLS, K_DIM, HALF, ROWS_HINT,
    # strides
    stride_a, stride_be, stride_bn, stride_bk, stride_bias, stride_c, stride_hidden, stride_pre,
    # compile-time constants
    TOP_K: tl.constexpr, GATHER_A: tl.constexpr, SCALE_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """``acc = A[rows of e] @ B[e]`` for one ``[BLOCK_M, BLOCK_N]`` tile of expert ``e``, then an epilogue.

    ``A`` row ``i`` is ``a[token of pair order[r]]`` with ``GATHER_A`` and
    ``a[r]`` otherwise, scaled by ``scale[order[r]]`` with ``SCALE_A``. ``B[e]``
    is read through strides, so it can be a weight or its transpose. The
    SwiGLU epilogues work on column ``n`` and column ``n + HALF`` together.
    ``ROWS_HINT`` (average rows per expert) only keys the autotuner.
    """
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, first_row, rows_left = _expert_of_tile(tile, counts_ptr, offsets_ptr, num_experts, capacity,
                                                   BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < rows_left
    rows = first_row + offs_m
    if GATHER_A or SCALE_A:
        pairs = tl.load(order_ptr + rows, mask=row_mask, other=0)
    if GATHER_A:
        a_rows = pairs // TOP_K
    else:
        a_rows = rows
    if SCALE_A:
        scale = tl.load(scale_ptr + pairs, mask=row_mask, other=0.0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_COLS
    b_base = b_ptr + expert * stride_be

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K_DIM
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if SCALE_A:
            a = a.to(tl.float32) * scale[:, None]
        a = cast_to(a, b_ptr.dtype.element_ty, ROUND_BF16)
        b = tl.load(b_base + cols[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_DOT)
        if EPILOGUE == SWIGLU:
            b_up = tl.load(b_base + (cols + HALF)[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                           mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = dot(a, b_up, acc_up, DOT_PRECISION, UPCAST_DOT)

    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BIAS:
        bias_base = bias_ptr + expert * stride_bias
        acc += tl.load(bias_base + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == SWIGLU:
            acc_up += tl.load(bias_base + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ty = c_ptr.dtype.element_ty
    c_ptrs = c_ptr + rows[:, None] * stride_c + cols[None, :]
    if EPILOGUE == STORE:
        tl.store(c_ptrs, cast_to(acc, out_ty, ROUND_BF16), mask=mask)
    elif EPILOGUE == SWIGLU or EPILOGUE == GELU or EPILOGUE == RELU:
        # The activation reads the rounded pre-activation that the backward reads.
        pre = cast_to(acc, out_ty, ROUND_BF16)
        tl.store(c_ptrs, pre, mask=mask)
        p = pre.to(tl.float32)
        if EPILOGUE == SWIGLU:
            up = cast_to(acc_up, out_ty, ROUND_BF16)
            tl.store(c_ptrs + HALF, up, mask=mask)
            hidden = p * tl.sigmoid(p) * up.to(tl.float32)
        elif EPILOGUE == GELU:
            hidden = 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))
        else:
            hidden = tl.where(p > 0.0, p, 0.0)
        hidden_ptrs = hidden_ptr + rows[:, None] * stride_hidden + cols[None, :]
        tl.store(hidden_ptrs, cast_to(hidden, out_ty, ROUND_BF16), mask=mask)
    else:
        pre_ptrs = pre_ptr + rows[:, None] * stride_pre + cols[None, :]
        p = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
        if EPILOGUE == SWIGLU_BACKWARD:
            up = tl.load(pre_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(p)
            tl.store(c_ptrs, cast_to(acc * up * sig * (1.0 + p * (1.0 - sig)), out_ty, ROUND_BF16), mask=mask)
            tl.store(c_ptrs + HALF, cast_to(acc * p * sig, out_ty, ROUND_BF16), mask=mask)
        elif EPILOGUE == GELU_BACKWARD:
            cdf = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476))
            pdf = 0.3989422804014327 * tl.exp(-0.5 * p * p)
            tl.store(c_ptrs, cast_to(acc * (cdf + p * pdf), out_ty, ROUND_BF16), mask=mask)
        else:
            tl.store(c_ptrs, cast_to(tl.where(p > 0.0, acc, 0.0), out_ty, ROUND_BF16), mask=mask)


@triton.jit
def _weight_grad_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, bias_grad_ptr, order_ptr, scale_ptr, counts_ptr, offsets_ptr,
    # sizes
    capacity, M_DIM, N_DIM, ROWS_HINT,
    # strides
    stride_a, stride_b, stride_oe, stride_om, stride_bias,
    # compile-time constants
    TOP_K: tl.constexpr, GATHER_A: tl.constexpr, SCALE_A: tl.constexpr, GATHER_B: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """``out[e] = A[rows of e]^T @ B[rows of e]`` for one ``[BLOCK_M, BLOCK_N]`` tile; program axis 0 is ``e``.

    ``A`` and ``B`` rows are read as in :func:`_grouped_matmul_kernel`
    (``GATHER_*`` through the token of each pair, ``SCALE_A`` by the pair's
    weight). With ``HAS_BIAS_GRAD`` the programs of the first column tile
    also write the row sums of ``A``. An expert with no rows gets zeros.
    """
    expert = tl.program_id(0)
    tile = tl.program_id(1)
    num_n_tiles = tl.cdiv(N_DIM, BLOCK_N)
    pid_m = tile // num_n_tiles
    pid_n = tile % num_n_tiles
    first_row = tl.load(offsets_ptr + expert)
    kept_rows = tl.minimum(tl.load(counts_ptr + expert).to(tl.int64), capacity)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M_DIM
    n_mask = offs_n < N_DIM

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, kept_rows, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_mask = offs_r < kept_rows
        rows = first_row + offs_r
        if GATHER_A or GATHER_B or SCALE_A:
            pairs = tl.load(order_ptr + rows, mask=r_mask, other=0)
        if GATHER_A:
            a_rows = pairs // TOP_K
        else:
            a_rows = rows
        if GATHER_B:
            b_rows = pairs // TOP_K
        else:
            b_rows = rows
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_a + offs_m[:, None],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        if SCALE_A:
            scale = tl.load(scale_ptr + pairs, mask=r_mask, other=0.0)
            a_t = a_t.to(tl.float32) * scale[None, :]
        a_t = cast_to(a_t, b_ptr.dtype.element_ty, ROUND_BF16)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_n[None, :],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(a_t, b, acc, DOT_PRECISION, UPCAST_DOT)
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(a_t.to(tl.float32), axis=1)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, ROUND_BF16), mask=out_mask)
    if HAS_BIAS_GRAD:
        if pid_n == 0:
            bias_ptrs = bias_grad_ptr + expert.to(tl.int64) * stride_bias + offs_m
            tl.store(bias_ptrs, cast_to(bias_acc, bias_grad_ptr.dtype.element_ty, ROUND_BF16), mask=m_mask)


@triton.jit
def _combine_kernel(
    rows_ptr, weights_ptr, row_of_pair_ptr, out_ptr,
    num_tokens, D, stride_rows, stride_out,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """``out[t] = sum_j w[t, j] rows[row(t, j)]`` in slot order, float32; dropped pairs add nothing.

    Without ``HAS_WEIGHTS`` every weight is 1 (the backward of the expert gather).
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = offs_t < num_tokens
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, TOP_K):
        pairs = offs_t.to(tl.int64) * TOP_K + j
        rows = tl.load(row_of_pair_ptr + pairs, mask=t_mask, other=-1)
        kept = rows >= 0
        values = tl.load(rows_ptr + rows[:, None] * stride_rows + offs_d[None, :],
                         mask=kept[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + pairs, mask=kept, other=0.0)
            # tl.where, not a product with 0, so that a NaN weight of a dropped pair stays out.
            values = tl.where(kept[:, None], values * weight[:, None], 0.0)
        acc += values
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + offs_d[None, :],
             cast_to(acc, out_ptr.dtype.element_ty, ROUND_BF16), mask=t_mask[:, None] & d_mask[None, :])


@triton.jit
def _slot_grad_kernel(
    grad_y_ptr, rows_ptr, row_of_pair_ptr, out_ptr,
    num_pairs, D, stride_grad, stride_rows,
    TOP_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[p] = <grad_y[p // k], rows[row_of_pair[p]]>`` in float32, zero for dropped pairs."""
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_mask = pairs < num_pairs
    rows = tl.load(row_of_pair_ptr + pairs, mask=p_mask, other=-1)
    kept = rows >= 0
    tokens = pairs // TOP_K
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        grad = tl.load(grad_y_ptr + tokens[:, None] * stride_grad + offs_d[None, :],
                       mask=kept[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        values = tl.load(rows_ptr + rows[:, None] * stride_rows + offs_d[None, :],
                         mask=kept[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(grad * values, axis=1)
    tl.store(out_ptr + pairs, acc, mask=p_mask)


# ----------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------


class TileConfig(NamedTuple):
    """Block sizes and launch settings of the two product kernels."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The first configuration of each list is the fixed one used without autotuning.
# NOTE: these lists are chosen by hand from the usual shapes of Hopper and Ampere
# matrix-product kernels. They have not been measured against each other yet.
_PRODUCT_CONFIGS = {
    "hopper": [TileConfig(128, 64, 64, 4, 4), TileConfig(128, 128, 64, 8, 3), TileConfig(64, 128, 64, 4, 4),
               TileConfig(64, 64, 64, 4, 4)],
    "ampere": [TileConfig(128, 64, 32, 4, 4), TileConfig(128, 128, 32, 8, 3), TileConfig(64, 128, 32, 4, 4),
               TileConfig(64, 64, 32, 4, 4)],
    "other": [TileConfig(64, 64, 32, 4, 2), TileConfig(32, 64, 32, 4, 2)],
    # Small tiles keep the interpreter quick; two of them exercise the autotuner there.
    "interpreter": [TileConfig(64, 32, 32, 4, 1), TileConfig(16, 16, 16, 4, 1)],
}


def gpu_generation(device: torch.device) -> str:
    """Return the configuration family of ``device``: ``"hopper"``, ``"ampere"``, ``"other"`` or ``"interpreter"``."""
    if device.type == "cpu":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9:
        return "hopper"
    if major == 8:
        return "ampere"
    return "other"


def product_configs(device: torch.device) -> list:
    """Return the candidate :class:`TileConfig` list of ``device``; the first is the fixed choice."""
    return list(_PRODUCT_CONFIGS[gpu_generation(device)])


def _triton_config(config: TileConfig, m_name: str, n_name: str, k_name: str) -> triton.Config:
    return triton.Config({m_name: config.block_m, n_name: config.block_n, k_name: config.block_k},
                         num_warps=config.num_warps, num_stages=config.num_stages)


def _time_once(kernel_call, quantiles=None):
    """Time one call on the host: the interpreter has no device timer for the autotuner."""
    start = time.perf_counter()
    kernel_call()
    elapsed = (time.perf_counter() - start) * 1e3
    return [elapsed] * len(quantiles) if quantiles else elapsed


@functools.lru_cache(maxsize=None)
def _tuned_kernel(name: str, generation: str):
    """Return ``name``'s kernel wrapped in ``triton.autotune`` over the configurations of ``generation``."""
    kernel, keys = {
        "matmul": (_grouped_matmul_kernel, ["N_COLS", "K_DIM", "ROWS_HINT", "EPILOGUE", "GATHER_A", "SCALE_A"]),
        "weight_grad": (_weight_grad_kernel, ["M_DIM", "N_DIM", "ROWS_HINT", "GATHER_A", "GATHER_B", "SCALE_A"]),
    }[name]
    configs = [_triton_config(c, "BLOCK_M", "BLOCK_N", "BLOCK_K") for c in _PRODUCT_CONFIGS[generation]]
    extra = {"do_bench": _time_once} if generation == "interpreter" else {}
    # Every kernel here overwrites its outputs from its inputs only, so the repeated timing runs
    # need no reset or restore of any buffer.
    return triton.autotune(configs=configs, key=keys, **extra)(kernel)


def _launch(name: str, grid, args: tuple, constants: dict, device: torch.device, autotune: bool) -> None:
    """Launch a product kernel: autotuned, or with the fixed first configuration of ``device``."""
    generation = gpu_generation(device)
    if autotune:
        _tuned_kernel(name, generation)[grid](*args, **constants)
        return
    config = _PRODUCT_CONFIGS[generation][0]
    kernel = _grouped_matmul_kernel if name == "matmul" else _weight_grad_kernel
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    kernel[grid(meta)](*args, **constants, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


class ExpertLayout(NamedTuple):
    """Placement of the ``N * k`` pairs in the expert buffers; see the module docstring.

    Attributes:
        order: ``[N * k]`` int64 pair numbers grouped by expert, token order inside each expert.
        offsets: ``[E + 1]`` int64 first row of each expert.
        counts: ``[E]`` int64 pairs routed to each expert (before the capacity).
        row_of_pair: ``[N * k]`` int64 row of each pair, ``-1`` for a dropped pair.
        top_k: ``k``.
        capacity: rows kept per expert at most (``N * k`` when nothing is dropped).
    """

    order: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    row_of_pair: torch.Tensor
    top_k: int
    capacity: int

    @property
    def kept(self) -> torch.Tensor:
        """``[N, k]`` bool mask of the kept pairs."""
        return (self.row_of_pair >= 0).view(-1, self.top_k)


def expert_layout(ids: torch.Tensor, num_experts: int, capacity: Optional[int] = None,
                  order: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                  counts: Optional[torch.Tensor] = None) -> ExpertLayout:
    """Build the :class:`ExpertLayout` of ``ids [N, k]`` on its device, with no host synchronisation.

    ``order``, ``offsets`` and ``counts`` may come from the routing kernels'
    dispatch. Otherwise a stable sort of the ids computes them, and one read
    on the host checks that the ids lie in ``[0, num_experts)``.
    ``capacity`` (``None``: no limit) keeps the first pairs of each expert in
    token order.

    The kernels trust a given layout: its values are never checked on the
    device, and values out of range make the kernels read out of bounds.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        description = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids)
        raise ValueError(f"ids must be an int64 tensor [N, k]; got a {description}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} is invalid; expected an integer >= 1")
    integer_types = (numbers.Integral, torch.SymInt)  # SymInt: a size traced by torch.compile
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, integer_types)
                                 or capacity < 0):
        raise ValueError(f"capacity={capacity!r} is invalid; expected None or an integer >= 0")
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    flat = ids.reshape(-1)
    if order is None:
        order = torch.sort(flat, stable=True).indices
    if counts is None:
        # bincount reads the largest id on the host anyway, so this path checks the id range too.
        if num_pairs and not 0 <= int(flat.min()) <= int(flat.max()) < num_experts:
            raise ValueError(f"ids must lie in [0, {num_experts}) for num_experts={num_experts}; "
                             f"got values from {int(flat.min())} to {int(flat.max())}")
        counts = torch.bincount(flat, minlength=num_experts)
    if offsets is None:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
        torch.cumsum(counts, dim=0, out=offsets[1:])
    rows = torch.arange(num_pairs, device=ids.device)
    limit = num_pairs if capacity is None else min(capacity, num_pairs)
    if limit < num_pairs:
        rank = rows - offsets.index_select(0, flat.index_select(0, order))
        rows = torch.where(rank < limit, rows, -1)
    # order is a permutation, so this scatter writes each element once.
    row_of_pair = torch.empty_like(rows).scatter_(0, order, rows)
    return ExpertLayout(order, offsets, counts.to(torch.int64), row_of_pair, top_k, limit)


def _check_layout(layout: ExpertLayout, num_tokens: int, num_experts: int, device: torch.device) -> None:
    num_pairs = num_tokens * layout.top_k
    for name, shape in (("order", (num_pairs,)), ("offsets", (num_experts + 1,)), ("counts", (num_experts,)),
                        ("row_of_pair", (num_pairs,))):
        check_tensor(f"layout.{name}", getattr(layout, name), shape, torch.int64, device)


def check_expert_inputs(x, weights, layout, up, up_bias, down, down_bias, activation) -> None:
    """Validate the arguments of :func:`experts_forward`; raise ``ValueError`` or ``TypeError`` naming the argument."""
    if activation not in ACTIVATIONS:
        expected = ", ".join(map(repr, ACTIVATIONS))
        raise ValueError(f"activation={activation!r} is not supported; expected one of {expected}")
    check_device("x", x)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, D]; got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x has dtype {x.dtype}; expected float32, bfloat16 or float16")
    num_tokens, dim = x.shape
    device, dtype = x.device, x.dtype
    check_tensor("x", x, (num_tokens, dim), dtype, device)
    if not isinstance(up, torch.Tensor) or up.dim() != 3:
        raise ValueError(f"up must be a 3-D tensor [E, U, D]; got {getattr(up, 'shape', type(up).__name__)}")
    num_experts, up_width = up.shape[:2]
    hidden = up_width // 2 if activation == "swiglu" else up_width
    if activation == "swiglu" and up_width % 2:
        raise ValueError(f"up has shape {tuple(up.shape)}; SwiGLU needs an even number of rows U = 2F")
    check_tensor("up", up, (num_experts, up_width, dim), dtype, device)
    check_tensor("down", down, (num_experts, dim, hidden), dtype, device)
    if up_bias is not None:
        check_tensor("up_bias", up_bias, (num_experts, up_width), dtype, device)
    if down_bias is not None:
        check_tensor("down_bias", down_bias, (num_experts, dim), dtype, device)
    check_tensor("weights", weights, (num_tokens, layout.top_k), torch.float32, device)
    if not weights.is_contiguous():
        raise ValueError(f"weights has strides {tuple(weights.stride())}; expected a contiguous tensor "
                         "(call .contiguous() on it)")
    _check_layout(layout, num_tokens, num_experts, device)


class ForwardResult(NamedTuple):
    """Outputs of :func:`experts_forward`; the row buffers have ``N * k`` rows, of which the kept ones are set."""

    y: torch.Tensor  # [N, D], dtype of x
    pre: torch.Tensor  # [N * k, U] pre-activations
    hidden: torch.Tensor  # [N * k, F] activations
    out: torch.Tensor  # [N * k, D] expert outputs


def _rows_hint(num_pairs: int, num_experts: int) -> int:
    return triton.next_power_of_2(max(1, num_pairs // max(1, num_experts)))


def _matmul_grid(num_pairs: int, num_experts: int, num_cols: int):
    # Each expert with pairs (at most min(E, N * k) of them) adds at most one partial tile.
    # Programs past the last tile exit at once.
    partial_tiles = min(num_experts, num_pairs)

    def grid(meta):
        return (triton.cdiv(num_pairs, meta["BLOCK_M"]) + partial_tiles, triton.cdiv(num_cols, meta["BLOCK_N"]))

    return grid


def _grouped_matmul(a, b, b_strides, out, layout, num_cols, k_dim, *, bias=None, hidden=None, pre=None, scale=None,
                    gather_a=False, epilogue=STORE, half=0, autotune=False):
    """Launch :func:`_grouped_matmul_kernel` over every kept row of ``layout``."""
    num_pairs = layout.order.numel()
    num_experts = layout.counts.numel()
    if num_pairs == 0 or num_cols == 0:
        return
    stride_be, stride_bn, stride_bk = b_strides
    dummy = out
    args = (
        a, b, bias if bias is not None else dummy, out, hidden if hidden is not None else dummy,
        pre if pre is not None else dummy, layout.order, scale if scale is not None else dummy,
        layout.counts, layout.offsets,
        num_experts, layout.capacity, num_cols, k_dim, half, _rows_hint(num_pairs, num_experts),
        a.stride(0), stride_be, stride_bn, stride_bk, bias.stride(0) if bias is not None else 0, out.stride(0),
        hidden.stride(0) if hidden is not None else 0, pre.stride(0) if pre is not None else 0,
    )
    constants = dict(
        TOP_K=layout.top_k, GATHER_A=gather_a, SCALE_A=scale is not None, HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, BLOCK_E=_BLOCK_E, DOT_PRECISION=dot_precision(b.dtype), UPCAST_DOT=INTERPRETED,
        ROUND_BF16=INTERPRETED,
    )
    _launch("matmul", _matmul_grid(num_pairs, num_experts, num_cols), args, constants, a.device, autotune)


def _weight_grad(a, b, out, layout, *, bias_grad=None, scale=None, gather_a=False, gather_b=False, autotune=False):
    """Launch :func:`_weight_grad_kernel`: ``out[e] = A[rows of e]^T B[rows of e]`` for every expert."""
    num_experts, m_dim, n_dim = out.shape
    if out.numel() == 0:
        return
    num_pairs = layout.order.numel()
    dummy = out
    args = (
        a, b, out, bias_grad if bias_grad is not None else dummy, layout.order,
        scale if scale is not None else dummy, layout.counts, layout.offsets,
        layout.capacity, m_dim, n_dim, _rows_hint(num_pairs, num_experts),
        a.stride(0), b.stride(0), out.stride(0), out.stride(1), bias_grad.stride(0) if bias_grad is not None else 0,
    )
    constants = dict(
        TOP_K=layout.top_k, GATHER_A=gather_a, SCALE_A=scale is not None, GATHER_B=gather_b,
        HAS_BIAS_GRAD=bias_grad is not None, DOT_PRECISION=dot_precision(b.dtype), UPCAST_DOT=INTERPRETED,
        ROUND_BF16=INTERPRETED,
    )

    def grid(meta):
        return (num_experts, triton.cdiv(m_dim, meta["BLOCK_M"]) * triton.cdiv(n_dim, meta["BLOCK_N"]))

    _launch("weight_grad", grid, args, constants, a.device, autotune)


def _combine(rows, weights, layout, out):
    """Launch :func:`_combine_kernel` into ``out [N, D]``."""
    num_tokens, dim = out.shape
    if out.numel() == 0:
        return
    block_t, block_d = (16, 64) if INTERPRETED else (16, 256)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    _combine_kernel[grid](
        rows, weights if weights is not None else rows, layout.row_of_pair, out,
        num_tokens, dim, rows.stride(0), out.stride(0),
        TOP_K=layout.top_k, HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        ROUND_BF16=INTERPRETED,
    )


def experts_forward(x: torch.Tensor, weights: torch.Tensor, layout: ExpertLayout, up: torch.Tensor,
                    up_bias: Optional[torch.Tensor], down: torch.Tensor, down_bias: Optional[torch.Tensor],
                    activation: str = "swiglu", *, autotune: bool = False) -> ForwardResult:
    """Run every expert on its pairs and combine: ``y [N, D]`` and the buffers the backward needs.

    Rows of dropped pairs hold zeros in the returned buffers.

    Args:
        x: expert input ``[N, D]``, float32, bfloat16 or float16; the weights have its dtype and device.
        weights: combine weights ``[N, k]``, float32.
        layout: the :class:`ExpertLayout` of the routing.
        up: ``[E, U, D]``, ``U = 2F`` for SwiGLU (gate rows first), ``F`` otherwise.
        up_bias: ``[E, U]`` or ``None``.
        down: ``[E, D, F]``.
        down_bias: ``[E, D]`` or ``None``.
        activation: ``"swiglu"``, ``"gelu"`` (exact, with erf) or ``"relu"``.
        autotune: time the candidate configurations on the first call of each shape
            and keep the fastest; otherwise use the fixed configuration of the GPU generation.

    Raises:
        ValueError, TypeError: shapes, dtypes, devices or strides that do not fit (see
            :func:`check_expert_inputs`).
        RuntimeError: CPU tensors while the Triton interpreter is off.
    """
    check_expert_inputs(x, weights, layout, up, up_bias, down, down_bias, activation)
    num_tokens, dim = x.shape
    num_pairs = num_tokens * layout.top_k
    up_width, hidden_width = up.shape[1], down.shape[2]
    # Rows of dropped pairs are never written: zero them so that the buffers hold no stale memory.
    allocate = x.new_zeros if layout.capacity < num_pairs else x.new_empty
    pre = allocate(num_pairs, up_width)
    hidden = allocate(num_pairs, hidden_width)
    out = allocate(num_pairs, dim)
    half = hidden_width if activation == "swiglu" else 0
    _grouped_matmul(x, up, (up.stride(0), up.stride(1), up.stride(2)), pre, layout, hidden_width, dim,
                    bias=up_bias, hidden=hidden, gather_a=True, epilogue=_FORWARD_EPILOGUE[activation], half=half,
                    autotune=autotune)
    _grouped_matmul(hidden, down, (down.stride(0), down.stride(1), down.stride(2)), out, layout, dim, hidden_width,
                    bias=down_bias, autotune=autotune)
    y = x.new_empty(num_tokens, dim)
    _combine(out, weights, layout, y)
    return ForwardResult(y, pre, hidden, out)


class BackwardResult(NamedTuple):
    """Gradients computed by :func:`experts_backward`; ``None`` where not requested or not present."""

    x: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    up: Optional[torch.Tensor]
    up_bias: Optional[torch.Tensor]
    down: Optional[torch.Tensor]
    down_bias: Optional[torch.Tensor]


def experts_backward(grad_y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, layout: ExpertLayout,
                     up: torch.Tensor, up_bias: Optional[torch.Tensor], down: torch.Tensor,
                     down_bias: Optional[torch.Tensor], activation: str, forward: ForwardResult,
                     needs_grad=(True,) * 6, *, autotune: bool = False) -> BackwardResult:
    """Gradients of :func:`experts_forward`'s ``y`` with respect to ``x``, ``weights`` and the expert parameters.

    ``needs_grad`` lists, in that order, which of the six gradients to compute
    (the gradient of an absent bias is always ``None``).
    ``grad_y [N, D]`` has the dtype of ``x``; every gradient has the dtype of its input.
    """
    needs_x, needs_weights, needs_up, needs_up_bias, needs_down, needs_down_bias = needs_grad
    needs_up_bias = needs_up_bias and up_bias is not None
    needs_down_bias = needs_down_bias and down_bias is not None
    num_tokens, dim = x.shape
    num_pairs = num_tokens * layout.top_k
    up_width, hidden_width = up.shape[1], down.shape[2]
    check_tensor("grad_y", grad_y, (num_tokens, dim), x.dtype, x.device)
    flat_weights = weights.reshape(-1)

    grad_weights = None
    if needs_weights:
        grad_weights = torch.empty(num_pairs, dtype=torch.float32, device=x.device)
        if num_pairs:
            block_p, block_d = (16, 64) if INTERPRETED else (32, 128)
            _slot_grad_kernel[(triton.cdiv(num_pairs, block_p),)](
                grad_y, forward.out, layout.row_of_pair, grad_weights, num_pairs, dim,
                grad_y.stride(0), forward.out.stride(0), TOP_K=layout.top_k, BLOCK_P=block_p, BLOCK_D=block_d,
            )
        grad_weights = grad_weights.view(num_tokens, layout.top_k)

    grad_down = grad_down_bias = None
    if needs_down or needs_down_bias:
        grad_down = torch.empty_like(down)
        grad_down_bias = torch.empty(down.shape[:2], dtype=down.dtype, device=x.device) if needs_down_bias else None
        _weight_grad(grad_y, forward.hidden, grad_down, layout, bias_grad=grad_down_bias, scale=flat_weights,
                     gather_a=True, autotune=autotune)
        grad_down = grad_down if needs_down else None

    grad_x = grad_up = grad_up_bias = None
    if needs_x or needs_up or needs_up_bias:
        # Gradient of the pre-activations: (w * grad_y) W_down, through the activation's derivative.
        grad_pre = x.new_empty(num_pairs, up_width)
        half = hidden_width if activation == "swiglu" else 0
        _grouped_matmul(grad_y, down, (down.stride(0), down.stride(2), down.stride(1)), grad_pre, layout,
                        hidden_width, dim, pre=forward.pre, scale=flat_weights, gather_a=True,
                        epilogue=_BACKWARD_EPILOGUE[activation], half=half, autotune=autotune)
        if needs_up or needs_up_bias:
            grad_up = torch.empty_like(up)
            grad_up_bias = torch.empty(up.shape[:2], dtype=up.dtype, device=x.device) if needs_up_bias else None
            _weight_grad(grad_pre, x, grad_up, layout, bias_grad=grad_up_bias, gather_b=True, autotune=autotune)
            grad_up = grad_up if needs_up else None
        if needs_x:
            grad_rows = x.new_empty(num_pairs, dim)
            _grouped_matmul(grad_pre, up, (up.stride(0), up.stride(2), up.stride(1)), grad_rows, layout, dim,
                            up_width, autotune=autotune)
            grad_x = torch.empty_like(x)
            _combine(grad_rows, None, layout, grad_x)
    return BackwardResult(grad_x, grad_weights, grad_up, grad_up_bias, grad_down, grad_down_bias)
