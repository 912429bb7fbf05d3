"""Timing and memory measurement used by the benchmarks.

On the CPU, times are medians of a warmed-up ``time.perf_counter`` loop. On
CUDA, they come from ``triton.testing.do_bench`` when Triton is installed (its
own warm-up and repeat counts, L2 cache cleared between runs), and otherwise
from the same loop with the device synchronised around each repeat. Memory is the
activation memory a step keeps for its backward: on CUDA the allocator's peak
above the memory in use before the forward, on the CPU the bytes of the
distinct tensors that autograd saves (parameters excluded).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> Dict[str, float]:
    """Run ``function`` ``warmup`` times, then time ``repeats`` runs; return median, min and max in ms.

    On CUDA with Triton installed, ``triton.testing.do_bench`` times it instead,
    with its own warm-up and repeat counts.
    """
    if device.type == "cuda" and _do_bench() is not None:
        median, low, high = _do_bench()(function, quantiles=[0.5, 0.0, 1.0])
        return {"median": median, "min": low, "max": high}
    for _ in range(warmup):
        function()
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def time_split_ms(forward: Callable[[], torch.Tensor], backward: Callable[..., None], device: torch.device,
                  repeats: int, warmup: int) -> Dict[str, Dict[str, float]]:
    """Time the forward alone, the backward alone and both; return median, min and max in ms per pass.

    ``backward(output, retain_graph=False)`` runs the backward of one forward's
    output. On CUDA with Triton the backward alone is timed on one forward's
    graph kept with ``retain_graph=True``; ``repeats`` and ``warmup`` then do not apply.
    """
    if device.type == "cuda" and _do_bench() is not None:
        # NOTE: this CUDA path has not been run on a GPU yet; the CPU path below is the tested one.
        output = forward()
        return {
            "fwd": time_ms(forward, device, repeats, warmup),
            "bwd": time_ms(lambda: backward(output, retain_graph=True), device, repeats, warmup),
            "fwd+bwd": time_ms(lambda: backward(forward()), device, repeats, warmup),
        }
    forward_times = time_ms(forward, device, repeats, warmup)
    both_times = time_ms(lambda: backward(forward()), device, repeats, warmup)
    backward_samples: List[float] = []
    for i in range(repeats + warmup):
        output = forward()
        _synchronize(device)
        start = time.perf_counter()
        backward(output)
        _synchronize(device)
        if i >= warmup:
            backward_samples.append((time.perf_counter() - start) * 1e3)
    backward_times = {
        "median": statistics.median(backward_samples), "min": min(backward_samples), "max": max(backward_samples)
    }
    return {"fwd": forward_times, "bwd": backward_times, "fwd+bwd": both_times}


def _do_bench():
    """Return ``triton.testing.do_bench``, or ``None`` when Triton is not installed."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def activation_bytes(forward: Callable[[], torch.Tensor], module: torch.nn.Module, device: torch.device) -> int:
    """Return the activation memory of one forward that is kept for the backward, in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = forward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del output
        return peak

    parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(storages.values())


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Return the measured rate of a square ``size`` matmul in FLOP/s (median of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    median_ms = time_ms(lambda: a @ b, device, repeats, warmup=2)["median"]
    return 2 * size**3 / (median_ms * 1e-3)
