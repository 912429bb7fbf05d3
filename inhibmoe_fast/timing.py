"""Timing and memory measurement used by the benchmarks.

On the CPU, times are medians of a warmed-up ``time.perf_counter`` loop. On
CUDA, the loop synchronises the device around each repeat. Memory is the
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
    """Run ``function`` ``warmup`` times, then time ``repeats`` runs; return median, min and max in ms."""
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


def time_split_ms(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None], device: torch.device,
                  repeats: int, warmup: int) -> Dict[str, Dict[str, float]]:
    """Time the forward alone, the backward alone and both, each as :func:`time_ms` reports it."""
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
