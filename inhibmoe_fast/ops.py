"""Functional operators of inhibmoe_fast.

``maxpool_align`` lines up a context source of any row count with the ``n_out``
tokens of a layer. Row window ``i`` is
``[floor(i * N_in / n_out), ceil((i + 1) * N_in / n_out))`` (windows overlap when
``n_out > N_in``), and values and indices equal those of
``torch.nn.functional.adaptive_max_pool1d`` over the rows, ties and NaN
included. The gradient sends each output gradient to the row its index names.

Both functions run the compiled operators ``torch.ops.inhibmoe_fast.maxpool_align``
and ``maxpool_align_multi`` (C++/CUDA extension ``inhibmoe_fast._C``). When the
extension is missing, they fall back to ``adaptive_max_pool1d`` and warn once.
"""

from __future__ import annotations

import warnings
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _maxpool_op

_fallback_warned = False


def _use_extension() -> bool:
    """Return True when the compiled operators are loaded; else warn once and return False."""
    global _fallback_warned
    if _maxpool_op.AVAILABLE:
        return True
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"inhibmoe_fast._C failed to import ({_maxpool_op.IMPORT_ERROR}); maxpool_align falls back to "
            "torch.nn.functional.adaptive_max_pool1d, which is slower. Reinstall the package to build the extension.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _check_source(x, n_out: int, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; maxpool_align needs a floating dtype")
    if x.dim() < 1:
        raise ValueError(f"{name} is a 0-d tensor; expected shape [..., C]")
    # flatten rather than reshape(-1, C), which cannot infer the row count when C == 0.
    rows = x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)
    if rows.shape[0] == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, i.e. N_in=0 rows; maxpool_align needs at least one row")
    return rows


def _check_n_out(n_out) -> int:
    if isinstance(n_out, bool) or not isinstance(n_out, (int, torch.SymInt)) or n_out < 0:
        raise ValueError(f"n_out={n_out!r} is invalid; expected an integer >= 0")
    return n_out


def _maxpool_align_torch(rows: torch.Tensor, n_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Align ``rows [N_in, C]`` with adaptive max-pooling over the row axis."""
    if n_out == 0 or rows.shape[1] == 0:
        return rows.new_empty(n_out, rows.shape[1]), torch.empty(n_out, rows.shape[1], dtype=torch.long, device=rows.device)
    values, indices = F.adaptive_max_pool1d(rows.t().unsqueeze(0), n_out, return_indices=True)
    return values[0].t(), indices[0].t()


def maxpool_align(x: torch.Tensor, n_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max-pool the rows of ``x [..., C]`` (flattened to ``[N_in, C]``) to ``n_out`` rows.

    Returns ``(values [n_out, C], indices int64 [n_out, C])``, where ``indices``
    are row numbers into the flattened input. ``values`` is differentiable.

    Raises:
        TypeError: ``x`` is not a floating tensor.
        ValueError: ``x`` has no rows (``N_in == 0``) or ``n_out`` is negative.
    """
    n_out = _check_n_out(n_out)
    rows = _check_source(x, n_out, "x")
    if _use_extension():
        return torch.ops.inhibmoe_fast.maxpool_align(rows, n_out)
    return _maxpool_align_torch(rows, n_out)


def maxpool_align_multi(sources: Sequence[torch.Tensor], n_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Align several sources ``[..., C_s]`` to ``n_out`` rows and concatenate their features.

    Returns ``(values [n_out, sum C_s], indices int64 [n_out, sum C_s])``; the
    indices of each block are row numbers into that block's own source. All
    sources must share one dtype and device.
    """
    n_out = _check_n_out(n_out)
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty; expected at least one tensor")
    rows = [_check_source(s, n_out, f"sources[{i}]") for i, s in enumerate(sources)]
    for i, r in enumerate(rows[1:], start=1):
        if r.dtype != rows[0].dtype or r.device != rows[0].device:
            raise ValueError(
                f"sources[{i}] is {r.dtype} on {r.device} but sources[0] is {rows[0].dtype} on {rows[0].device}; "
                "all sources must share one dtype and device"
            )
    if _use_extension():
        return torch.ops.inhibmoe_fast.maxpool_align_multi(rows, n_out)
    pooled = [_maxpool_align_torch(r, n_out) for r in rows]
    return torch.cat([v for v, _ in pooled], dim=1), torch.cat([i for _, i in pooled], dim=1)


def __getattr__(name: str):
    # ``route`` (fused Triton routing) lives in inhibmoe_fast.routing, which imports this
    # module, so it is loaded on first access instead of at import time.
    if name == "route":
        from .routing import route

        return route
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
