"""Benchmark of the inhibited MoE layer: ``python -m inhibmoe_fast.bench``.

It runs five parts on the device it finds (or the one given):

1. parity: the fast layer against the reference in float64 on a few shapes,
   with the max error of the output and of every gradient;
2. layer: the providers on each shape of the device's set (a CPU set or a GPU
   set), all on the same input and with the same router and expert weights:
   the reference layer, the reference under ``torch.compile`` (compile time
   reported apart), a Mixtral-style sparse MoE block
   (:mod:`inhibmoe_fast.baselines`) and the fast layer with inhibition
   ``none``, ``local`` (full gate), ``local`` with a low-rank gate and
   ``global``; on CUDA also the fast layer's parts alone. Per provider and pass
   (fwd, bwd, fwd+bwd): median, min and max time, activation memory, model
   GFLOP/s, and the ratios to the reference and to the matmul rate measured in
   the same run;
3. sweep: forward+backward time of the reference, the Mixtral-style block and
   the fast layer as the tokens and the experts grow;
4. maxpool: the ``maxpool_align`` operator against the PyTorch route;
5. train: one epoch of a small digit classifier with one MoE layer, fast layer
   against reference, with the time per epoch and the test accuracy.

Tables are printed; CSV files (with the device name, library versions and
date in every row) and PNG plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import functools
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .baselines import MixtralStyleMoE
from .bench_maxpool import bench_maxpool, parse_sizes
from .layer import InhibitedMoE, triton_available
from .reference import ReferenceMoE
from .timing import activation_bytes, matmul_rate, time_ms, time_split_ms

PARITY_SHAPES = [
    # tokens, dim, hidden, experts, top_k, options
    (37, 24, 20, 6, 2, dict(inhibition="local")),
    (64, 32, 16, 8, 3, dict(inhibition="global", gate_rank=8, context_dims=(12,))),
    (50, 17, 9, 5, 1, dict(inhibition="none", activation="gelu", expert_bias=True, capacity_factor=0.8)),
]


def layer_flops(tokens: int, dim: int, hidden: int, experts: int, top_k: int, inhibition: str, gate_rank, activation,
                context_dims=()):
    """Return the forward FLOPs of the layer's matmuls: gate, context projections, router and experts."""
    flops = 2 * tokens * dim * experts
    flops += 2 * tokens * dim * sum(context_dims)
    flops += 2 * tokens * top_k * dim * hidden * (3 if activation == "swiglu" else 2)
    if inhibition in ("local", "global"):
        flops += 2 * tokens * dim * (dim if gate_rank is None else 2 * gate_rank)
    return flops


def print_table(title: str, rows: List[Dict[str, object]], columns: List[str]) -> None:
    """Print ``rows`` as a right-aligned table of ``columns`` under ``title``."""
    print(f"\n{title}")
    widths = [max(len(c), *(len(_format(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_format(row.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.2f}"
    return "" if value is None else str(value)


def _write_csv(path: str, rows: List[Dict[str, object]], header: Dict[str, str]) -> None:
    columns = list(header) + [c for c in rows[0] if c not in header] if rows else list(header)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**header, **row})


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, leave=False, file=sys.stderr)


def run_parity(device: torch.device) -> List[Dict[str, object]]:
    """Compare the fast layer with the reference in float64; return one row per shape and tensor."""
    rows = []
    for tokens, dim, hidden, experts, top_k, options in PARITY_SHAPES:
        torch.manual_seed(0)
        reference = ReferenceMoE(dim, hidden, experts, top_k, device=device, dtype=torch.float64, **options)
        fast = InhibitedMoE(dim, hidden, experts, top_k, device=device, dtype=torch.float64, **options)
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(tokens, dim, device=device, dtype=torch.float64)
        context = [torch.randn(2 * tokens + 3, w, device=device, dtype=torch.float64) for w in options.get("context_dims", ())]
        grad = torch.randn(tokens, dim, device=device, dtype=torch.float64)
        results = []
        for layer in (reference, fast):
            inputs = x.clone().requires_grad_()
            y = layer(inputs, context or None)
            y.backward(grad)
            tensors = {"output": y.detach(), "grad x": inputs.grad}
            tensors.update({f"grad {n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
            results.append(tensors)
        shape = f"N={tokens} D={dim} F={hidden} E={experts} k={top_k} {options.get('inhibition')}"
        ids_equal = torch.equal(reference.aux.ids, fast.aux.ids)
        for name, expected in results[0].items():
            error = (results[1][name] - expected).abs().max().item() if expected.numel() else 0.0
            rows.append({"shape": shape, "tensor": name, "max_abs_error": error, "ids_equal": ids_equal})
    return rows


@dataclasses.dataclass(frozen=True)
class Shape:
    """One layer configuration of the provider comparison."""

    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int
    dtype: str
    gate_rank: Optional[int]  # rank of the "local" and "global" gates; None for a full D x D gate
    low_rank: int  # rank of the "local-lowrank" gate

    def label(self) -> str:
        gate = f"gate {'full' if self.gate_rank is None else f'rank {self.gate_rank}'}, low rank {self.low_rank}"
        return f"N={self.tokens} D={self.dim} F={self.hidden} E={self.experts} k={self.top_k} {self.dtype}, {gate}"


# The CPU set keeps the whole default bench within a few minutes on two cores.
CPU_SHAPES = [Shape(4096, 256, 256, 64, 2, "float32", None, 32)]
CPU_TOKEN_SWEEP = [512, 1024, 2048, 4096, 8192]
CPU_EXPERT_SWEEP = [(8, 2), (16, 2), (32, 2), (64, 2), (128, 2)]

# Mixtral-like sizes: model width 2048, 64 or 128 experts, top-2 and top-8.
# NOTE: the GPU set has not been run yet; its sizes are chosen, not measured to fit a time budget.
GPU_SHAPES = [
    Shape(16384, 2048, 1024, 64, 2, "bfloat16", None, 128),
    Shape(8192, 2048, 768, 128, 8, "bfloat16", None, 128),
]
GPU_TOKEN_SWEEP = [2048, 4096, 8192, 16384, 32768]
GPU_EXPERT_SWEEP = [(64, 2), (64, 8), (128, 2), (128, 8)]

BASELINES = ("reference", "reference-compiled", "mixtral-style")
INHIBITIONS = ("none", "local", "local-lowrank", "global")
PASS_FLOPS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


@dataclasses.dataclass
class Provider:
    """One timed implementation: a module, the call that runs its forward, and its model FLOPs per forward."""

    name: str
    module: torch.nn.Module
    forward: Callable[[], torch.Tensor]
    inputs: List[torch.Tensor]  # tensors whose gradients each backward computes
    flops: Optional[int]
    compile_seconds: Optional[float] = None
    grad: Optional[torch.Tensor] = None

    def backward(self, output: torch.Tensor, retain_graph: bool = False) -> None:
        for tensor in self.inputs:
            tensor.grad = None
        for parameter in self.module.parameters():
            parameter.grad = None
        if self.grad is None:
            self.grad = torch.randn_like(output)
        output.backward(self.grad, retain_graph=retain_graph)


def _layer_options(inhibition: str, shape: Shape) -> Dict[str, object]:
    """Return the ``InhibitedMoE`` options of a fast-layer variant named by ``inhibition``."""
    if inhibition == "none":
        return dict(inhibition="none")
    if inhibition == "local-lowrank":
        return dict(inhibition="local", gate_rank=shape.low_rank)
    if inhibition == "local":
        return dict(inhibition="local", gate_rank=shape.gate_rank)
    if inhibition == "global":
        return dict(inhibition="global", gate_rank=shape.gate_rank, context_dims=(shape.dim,))
    raise ValueError(f"inhibition {inhibition!r} is invalid; expected one of {', '.join(INHIBITIONS)}")


def _fast_name(backend: str, inhibition: str, shape: Shape) -> str:
    suffix = f" r={shape.low_rank}" if inhibition == "local-lowrank" else ""
    return f"fast[{backend}] {inhibition.replace('-lowrank', '')}{suffix}"


def _compile_reference(reference: torch.nn.Module, x: torch.Tensor) -> Optional[Provider]:
    """Compile the reference with ``torch.compile``; return its provider, or ``None`` (with a message) on failure.

    The first two forward and backward calls compile: the second recompiles
    with dynamic shapes, because the number of tokens per expert changes.
    Their time is reported as compile seconds and kept out of the timings.
    """
    from torch._dynamo.exc import TorchDynamoException

    compiled = torch.compile(reference)
    provider = Provider("reference compiled", reference, lambda: compiled(x), [x], None)
    start = time.perf_counter()
    try:
        for _ in range(2):
            provider.backward(provider.forward())
    except (TorchDynamoException, RuntimeError, OSError) as error:
        print(f"\nreference compiled: skipped, torch.compile failed: {type(error).__name__}: {error}")
        return None
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    provider.compile_seconds = time.perf_counter() - start
    return provider


def build_providers(shape: Shape, device: torch.device, baselines: Sequence[str], backends: Sequence[str],
                    inhibitions: Sequence[str], parts: bool = False) -> List[Provider]:
    """Build every provider of ``shape`` on the same input, with the router and expert weights of one seeded layer.

    The reference, its compiled form, the Mixtral-style block and the fast
    layer without inhibition compute the same function; the inhibited variants
    add their gate (drawn from a fixed seed) in front of the same router and experts.
    """
    dtype = getattr(torch, shape.dtype)
    dims = (shape.dim, shape.hidden, shape.experts, shape.top_k)
    torch.manual_seed(0)
    reference = ReferenceMoE(*dims, inhibition="none", device=device, dtype=dtype)
    shared = reference.state_dict()
    x = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)
    context = [torch.randn(shape.tokens // 2 + 1, shape.dim, device=device, dtype=dtype)]
    plain_flops = layer_flops(shape.tokens, *dims, "none", None, "swiglu")

    providers = []
    if "reference" in baselines:
        providers.append(Provider("reference", reference, lambda: reference(x), [x], plain_flops))
    if "reference-compiled" in baselines:
        compiled = _compile_reference(copy.deepcopy(reference), x)
        if compiled is not None:
            compiled.flops = plain_flops
            providers.append(compiled)
    if "mixtral-style" in baselines:
        block = MixtralStyleMoE.from_layer(reference)
        providers.append(Provider("mixtral-style", block, lambda: block(x), [x], plain_flops))

    for backend in backends:
        for inhibition in inhibitions:
            options = _layer_options(inhibition, shape)
            torch.manual_seed(1)
            layer = InhibitedMoE(*dims, backend=backend, device=device, dtype=dtype, **options)
            layer.load_state_dict(shared, strict=False)
            layer_context = context if inhibition == "global" else None
            flops = layer_flops(shape.tokens, *dims, options["inhibition"], options.get("gate_rank"), "swiglu",
                                options.get("context_dims", ()))
            providers.append(Provider(_fast_name(backend, inhibition, shape), layer,
                                      functools.partial(layer, x, layer_context), [x], flops))
    if parts:
        providers += part_providers(shape, device, dtype, shared)
    return providers


def part_providers(shape: Shape, device: torch.device, dtype: torch.dtype, shared) -> List[Provider]:
    """Build providers for the fast layer's parts alone: fused routing, the experts, ``maxpool_align``.

    Routing uses the full local gate of :func:`inhibmoe_fast.ops.route`. The
    experts run twice on the same dispatch: through the ``"torch"`` backend
    (PyTorch matrix products over gathered rows) and through the Triton expert
    kernels, combine included. Routing and the Triton experts need CUDA, or the
    Triton interpreter (``TRITON_INTERPRET=1``) on the CPU.
    """
    # NOTE: meant for CUDA and not run on a GPU yet; the tests run it on the CPU under the Triton interpreter.
    from . import ops
    from .dispatch import gather_tokens, plan_dispatch
    from .expert_ops import experts as triton_experts
    from .kernels.experts import expert_layout
    from .torch_backend import PADDED_LAYOUT_MAX_RATIO, experts

    dims = (shape.dim, shape.hidden, shape.experts, shape.top_k)
    torch.manual_seed(1)
    layer = InhibitedMoE(*dims, inhibition="local", backend="torch", device=device, dtype=dtype)
    layer.load_state_dict(shared, strict=False)
    x = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)

    def route():
        return ops.route(x, layer.router_weight, layer.router_bias, top_k=shape.top_k, gate_weight=layer.inhibit_weight,
                         gate_bias=layer.inhibit_bias).weights

    with torch.no_grad():
        routing = ops.route(x, layer.router_weight, layer.router_bias, top_k=shape.top_k)
    plan = plan_dispatch(routing.ids, shape.experts, None, PADDED_LAYOUT_MAX_RATIO)
    rows = gather_tokens(x.detach(), plan, shape.top_k).requires_grad_()
    layout = expert_layout(routing.ids, shape.experts, None, routing.order, routing.offsets, routing.counts)
    weights = routing.weights.detach().requires_grad_()

    def kernel_experts():
        return triton_experts(x, weights, layout, layer.expert_up, None, layer.expert_down, None, "swiglu")
    source = torch.randn(2 * shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)
    route_flops = layer_flops(shape.tokens, shape.dim, 0, shape.experts, 0, "local", None, "swiglu")
    expert_flops = 2 * shape.tokens * shape.top_k * shape.dim * shape.hidden * 3
    return [
        Provider("part: route (triton, local)", layer, route, [x], route_flops),
        Provider("part: experts (torch)", layer, lambda: experts(layer, rows, plan), [rows], expert_flops),
        Provider("part: experts+combine (triton)", layer, kernel_experts, [x, weights], expert_flops),
        Provider("part: maxpool_align", layer, lambda: ops.maxpool_align(source, shape.tokens)[0], [source], None),
    ]


def _rate_columns(flops: Optional[int], median_ms: float, rate: float) -> Dict[str, Optional[float]]:
    if flops is None:
        return {"gflops": None, "of_matmul_rate": None}
    per_second = flops / (median_ms * 1e-3)
    return {"gflops": per_second / 1e9, "of_matmul_rate": per_second / rate}


def _use_rate(rows: List[Dict[str, object]], rate: float) -> None:
    """Recompute the ``of_matmul_rate`` column of ``rows`` for the matmul ``rate`` in FLOP/s."""
    for row in rows:
        if row["gflops"] is not None:
            row["of_matmul_rate"] = row["gflops"] * 1e9 / rate


def run_layer(args, shape: Shape, device: torch.device, rate: float) -> List[Dict[str, object]]:
    """Time every provider on ``shape``; return one row per (provider, pass)."""
    providers = build_providers(shape, device, args.baselines, args.backends, args.inhibitions, args.parts)
    rows = []
    for provider in _progress(providers, "layer", args.progress):
        times = time_split_ms(provider.forward, provider.backward, device, args.repeats, args.warmup)
        memory = None
        # The CPU measure hooks autograd's saved tensors, which torch.compile would trace and recompile for.
        if provider.compile_seconds is None or device.type == "cuda":
            memory = activation_bytes(provider.forward, provider.module, device) / 2**20
        for name, t in times.items():
            flops = None if provider.flops is None else provider.flops * PASS_FLOPS[name]
            rows.append({
                "shape": shape.label(), "provider": provider.name, "pass": name,
                "median_ms": t["median"], "min_ms": t["min"], "max_ms": t["max"],
                **_rate_columns(flops, t["median"], rate),
                "activation_mib": memory, "compile_s": provider.compile_seconds,
            })
    reference = {r["pass"]: r["median_ms"] for r in rows if r["provider"] == "reference"}
    for row in rows:
        baseline = reference.get(row["pass"])
        row["speedup_vs_reference"] = baseline / row["median_ms"] if baseline else None
    return rows


def run_sweep(args, points: Sequence[Shape], variable: str, device: torch.device, rate: float) -> List[Dict[str, object]]:
    """Time forward+backward of the reference, the Mixtral-style block and the fast layer at each point."""
    baselines = [b for b in ("reference", "mixtral-style") if b in args.baselines]
    inhibitions = [i for i in ("none", "local") if i in args.inhibitions]
    rows = []
    for shape in _progress(points, f"sweep {variable}", args.progress):
        for provider in build_providers(shape, device, baselines, args.backends, inhibitions):
            times = time_ms(lambda: provider.backward(provider.forward()), device, args.sweep_repeats, warmup=1)
            rows.append({
                "sweep": variable, "tokens": shape.tokens, "experts": shape.experts, "top_k": shape.top_k,
                "provider": provider.name, "pass": "fwd+bwd",
                "median_ms": times["median"], "min_ms": times["min"], "max_ms": times["max"],
                **_rate_columns(None if provider.flops is None else 3 * provider.flops, times["median"], rate),
            })
    return rows


def sweep_points(shapes: Sequence[Shape], tokens: Sequence[int], experts: Sequence[Tuple[int, int]]):
    """Return the token sweep around the first shape and the expert sweep around the last one."""
    token_points = [dataclasses.replace(shapes[0], tokens=n) for n in tokens]
    expert_points = [dataclasses.replace(shapes[-1], experts=e, top_k=k) for e, k in experts]
    return token_points, expert_points


def run_maxpool(args, device: torch.device) -> List[Dict[str, object]]:
    """Benchmark ``maxpool_align`` against the PyTorch route, when the benchmark module is present."""
    try:
        return bench_maxpool(str(device), torch.float32, args.maxpool_sizes, args.repeats)
    except RuntimeError as error:  # the extension is not built
        print(f"\nmaxpool_align: skipped, {error}")
        return []


def run_training(args, device: torch.device) -> List[Dict[str, object]]:
    """Train a digit classifier with one MoE layer for ``args.train_epochs`` epochs, fast layer against reference."""
    from .train_digits import train_digits

    rows = []
    for backend in _progress([*args.backends, "reference"], "train", args.progress):
        rows.append(train_digits(backend, device, epochs=args.train_epochs, seed=0))
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer(path: str, layer_rows: List[Dict[str, object]], device_name: str) -> None:
    """Draw latency per pass and activation memory per provider, one row of panels per shape."""
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in layer_rows))
    passes = list(PASS_FLOPS)
    figure, axes = plt.subplots(len(shapes), 2, figsize=(14, 5 * len(shapes)), squeeze=False)
    width = 0.8 / len(passes)
    for (latency_axis, memory_axis), shape in zip(axes, shapes):
        rows = [r for r in layer_rows if r["shape"] == shape]
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        positions = range(len(providers))
        labels = [p.replace("] ", "]\n").replace(": ", ":\n").replace(" compiled", "\ncompiled") for p in providers]
        for i, name in enumerate(passes):
            values = [next(r["median_ms"] for r in rows if r["provider"] == p and r["pass"] == name) for p in providers]
            latency_axis.bar([j + i * width for j in positions], values, width, label=name)
        latency_axis.set_xticks([j + width for j in positions])
        latency_axis.set_xticklabels(labels, fontsize=8)
        latency_axis.set_ylabel("median time (ms)")
        latency_axis.set_yscale("log")
        latency_axis.set_title(f"latency on {device_name}\n{shape}", fontsize=9)
        latency_axis.legend()
        memory = [next(r["activation_mib"] for r in rows if r["provider"] == p) or 0.0 for p in providers]
        memory_axis.bar(positions, memory)
        memory_axis.set_xticks(list(positions))
        memory_axis.set_xticklabels(labels, fontsize=8)
        memory_axis.set_ylabel("activation memory kept for backward (MiB)")
        memory_axis.set_title("memory per provider", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sweeps(path: str, sweep_rows: List[Dict[str, object]], device_name: str) -> None:
    """Draw forward+backward latency against tokens and against experts, one line per provider."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, variable in zip(axes, ("tokens", "experts")):
        rows = [r for r in sweep_rows if r["sweep"] == variable]
        several_k = len({r["top_k"] for r in rows}) > 1
        for provider, top_k in dict.fromkeys((r["provider"], r["top_k"]) for r in rows):
            points = [r for r in rows if r["provider"] == provider and r["top_k"] == top_k]
            xs = [r[variable] for r in points]
            label = f"{provider} k={top_k}" if several_k else provider
            axis.plot(xs, [r["median_ms"] for r in points], marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(variable)
        axis.set_ylabel("forward+backward median time (ms)")
        axis.set_title(f"latency vs {variable} on {device_name}", fontsize=9)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _versions() -> Dict[str, str]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    return versions


def _comma_list(text: str) -> List[str]:
    return [item for item in text.split(",") if item]


def _at_least(minimum: int):
    """Return an argparse type that takes integers of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid; expected an integer >= {minimum}")
        return value

    return parse


_positive = _at_least(1)


def _choice_list(choices: Sequence[str], allow_empty: bool = False):
    """Return an argparse type that takes a comma-separated list of names from ``choices``."""

    def parse(text: str) -> List[str]:
        items = _comma_list(text)
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError(f"empty list; expected some of {','.join(choices)}")
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(unknown)}; expected some of {','.join(choices)}")
        return items

    return parse


def _baseline_list(text: str) -> List[str]:
    return [] if text == "none" else _comma_list(text)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(item) for item in text.split(",") if item]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"list {text!r} is invalid; expected comma-separated positive integers, e.g. 1024,4096")
    return values


def _expert_list(text: str) -> List[Tuple[int, Optional[int]]]:
    points = []
    for item in filter(None, text.split(",")):
        experts, _, top_k = item.partition("x")
        try:
            point = (int(experts), int(top_k) if top_k else None)
        except ValueError:
            point = (0, None)
        if point[0] < 1 or not 1 <= (point[1] or 1) <= point[0]:
            raise argparse.ArgumentTypeError(
                f"expert point {item!r} is invalid; expected E or ExK with 1 <= K <= E, e.g. 64 or 128x8"
            )
        points.append(point)
    if not points:
        raise argparse.ArgumentTypeError(f"expert sweep {text!r} is empty; expected E or ExK points, e.g. 64,128x8")
    return points


SHAPE_OPTIONS = ("tokens", "dim", "hidden", "experts", "top_k")
PARTS = ("parity", "layer", "sweep", "maxpool", "train")


def select_shapes(args, device: torch.device) -> List[Shape]:
    """Return the device's shape set, or one shape when any of the size options is given."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    sizes = {name: getattr(args, name) for name in SHAPE_OPTIONS if getattr(args, name) is not None}
    if sizes:
        shapes = [dataclasses.replace(shapes[0], **sizes)]
    common = {"dtype": args.dtype, "gate_rank": args.gate_rank, "low_rank": args.low_rank}
    common = {name: value for name, value in common.items() if value is not None}
    return [dataclasses.replace(shape, **common) for shape in shapes]


def select_sweeps(args, device: torch.device, shapes: Sequence[Shape]):
    """Return the token sweep and the expert sweep (lists of shapes) from the options or the device's defaults."""
    gpu = device.type == "cuda"
    tokens = args.token_sweep
    if tokens is None:
        tokens = GPU_TOKEN_SWEEP if gpu else CPU_TOKEN_SWEEP
    experts = args.expert_sweep
    if experts is None:
        experts = GPU_EXPERT_SWEEP if gpu else CPU_EXPERT_SWEEP
    experts = [(e, shapes[-1].top_k if k is None else k) for e, k in experts]
    return sweep_points(shapes, tokens, experts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inhibmoe_fast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available); default auto")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "float64"],
                        help="dtype of the timed layers; default float32 on CPU, bfloat16 on CUDA")
    sizes = "; default: the device's shape set (any of these options replaces the set by one shape)"
    parser.add_argument("--tokens", type=_positive, default=None, help="tokens N per call" + sizes)
    parser.add_argument("--dim", type=_positive, default=None, help="model width D" + sizes)
    parser.add_argument("--hidden", type=_positive, default=None, help="expert width F" + sizes)
    parser.add_argument("--experts", type=_positive, default=None, help="experts E" + sizes)
    parser.add_argument("--top-k", type=_positive, default=None, help="experts per token k" + sizes)
    parser.add_argument("--gate-rank", type=_positive, default=None,
                        help="rank of the local and global gates; default full rank")
    parser.add_argument("--low-rank", type=_positive, default=None,
                        help="rank of the local-lowrank gate; default 32 on CPU, 128 on CUDA")
    parser.add_argument("--baselines", type=_baseline_list, default=list(BASELINES),
                        help=f"comma-separated baselines to time, or none; default {','.join(BASELINES)}")
    parser.add_argument("--inhibitions", type=_comma_list, default=list(INHIBITIONS),
                        help=f"comma-separated inhibitions of the fast layer to time; default {','.join(INHIBITIONS)}")
    parser.add_argument("--backends", type=_choice_list(("torch", "triton", "reference")), default=None,
                        help="comma-separated backends of the fast layer; default torch on CPU, torch,triton on CUDA")
    parser.add_argument("--parts", action="store_true",
                        help="also time the fast layer's parts alone (routing needs CUDA or TRITON_INTERPRET=1); "
                             "default on for CUDA with Triton")
    parser.add_argument("--repeats", type=_positive, default=5,
                        help="timed repeats per measurement on the CPU (median reported); default 5")
    parser.add_argument("--warmup", type=_at_least(0), default=2, help="untimed runs before each CPU measurement; default 2")
    parser.add_argument("--token-sweep", type=_int_list, default=None,
                        help="token counts of the token sweep; default " + ",".join(map(str, CPU_TOKEN_SWEEP))
                             + " on CPU, " + ",".join(map(str, GPU_TOKEN_SWEEP)) + " on CUDA")
    parser.add_argument("--expert-sweep", type=_expert_list, default=None,
                        help="points E or ExK of the expert sweep; default 8,16,32,64,128 (k=2) on CPU, "
                             "64x2,64x8,128x2,128x8 on CUDA")
    parser.add_argument("--sweep-repeats", type=_positive, default=3,
                        help="timed repeats per sweep point on the CPU; default 3")
    parser.add_argument("--matmul-size", type=_positive, default=None,
                        help="side of the square matmul that measures the device rate; default 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--maxpool-sizes", type=parse_sizes, default=parse_sizes("4096x256x1024,65536x1024x4096"),
                        help="maxpool_align sizes as N_INxCxN_OUT[,...]; default 4096x256x1024,65536x1024x4096")
    parser.add_argument("--train-epochs", type=_positive, default=1, help="epochs of the digits training run; default 1")
    parser.add_argument("--skip", type=_choice_list(PARTS, allow_empty=True), default=[],
                        help="comma-separated parts to skip: parity, layer, sweep, maxpool, train")
    parser.add_argument("--out", default="results", help="folder for the CSV files and plots; default ./results")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return parser


LAYER_COLUMNS = ["provider", "pass", "median_ms", "min_ms", "max_ms", "gflops", "of_matmul_rate",
                 "speedup_vs_reference", "activation_mib", "compile_s"]
SWEEP_COLUMNS = ["tokens", "experts", "top_k", "provider", "median_ms", "min_ms", "max_ms", "gflops", "of_matmul_rate"]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            parser.error(f"--device {args.device!r} is invalid; expected cpu, cuda, cuda:N or auto")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    gpu_with_triton = device.type == "cuda" and triton_available()
    if args.backends is None:
        args.backends = ["torch", "triton"] if gpu_with_triton else ["torch"]
    args.parts = args.parts or gpu_with_triton
    unknown = sorted(set(args.inhibitions) - set(INHIBITIONS)) + sorted(set(args.baselines) - set(BASELINES))
    if unknown:
        raise SystemExit(f"unknown provider(s) {', '.join(unknown)}; --inhibitions takes {','.join(INHIBITIONS)} "
                         f"and --baselines takes {','.join(BASELINES)}")
    if not args.inhibitions:
        parser.error(f"--inhibitions is empty; expected some of {','.join(INHIBITIONS)}")
    if "triton" in args.backends and args.dtype == "float64":
        parser.error("--backends triton takes float32, bfloat16 or float16; got --dtype float64")
    if "triton" in args.backends and not triton_available():
        parser.error("--backends triton needs the triton package, which is not installed")
    if "triton" in args.backends and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--backends triton on the CPU needs TRITON_INTERPRET=1 in the environment (the Triton interpreter)")
    shapes = select_shapes(args, device)
    token_points, expert_points = select_sweeps(args, device, shapes)
    for shape in shapes + expert_points:
        if shape.top_k > shape.experts:
            parser.error(f"top_k={shape.top_k} is larger than experts={shape.experts} (from --top-k, --experts or "
                         f"--expert-sweep); expected top_k <= experts")
    os.makedirs(args.out, exist_ok=True)
    device_name = _device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = {"device": device_name, **_versions(), "date": stamp}
    print(f"inhibmoe_fast bench on {device_name}; " + "; ".join(f"{k} {v}" for k, v in _versions().items())
          + f"; {stamp}")

    if "parity" not in args.skip:
        rows = run_parity(device)
        print_table("Parity: fast vs reference, float64 (max abs error)", rows,
                     ["shape", "tensor", "max_abs_error", "ids_equal"])
        _write_csv(os.path.join(args.out, "parity.csv"), rows, header)

    rates: Dict[str, float] = {}
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)

    def rate_of(dtype: str) -> float:
        if dtype not in rates:
            rates[dtype] = matmul_rate(device, getattr(torch, dtype), size)
            print(f"\n{dtype} matmul rate, {size}x{size}x{size}: {rates[dtype] / 1e9:.1f} GFLOP/s")
        return rates[dtype]

    if "layer" not in args.skip:
        tables = [(shape, run_layer(args, shape, device, rate_of(shape.dtype))) for shape in shapes]
        # A slow moment during the first matmul timing would lower the rate and inflate every fraction,
        # so the rate is measured again after the layer timings and the higher of the two is used.
        for dtype in list(rates):
            second_rate = matmul_rate(device, getattr(torch, dtype), size)
            print(f"{dtype} matmul rate measured again after the layer timings: {second_rate / 1e9:.1f} GFLOP/s")
            if second_rate > rates[dtype]:
                for shape, shape_rows in tables:
                    if shape.dtype == dtype:
                        _use_rate(shape_rows, second_rate)
                rates[dtype] = second_rate
        rows = []
        for shape, shape_rows in tables:
            print_table(f"Layer: {shape.label()}, swiglu, fractions of the higher matmul rate", shape_rows,
                        LAYER_COLUMNS)
            rows += shape_rows
        matmul = {"matmul_size": size, **{f"matmul_gflops_{d}": r / 1e9 for d, r in rates.items()}}
        _write_csv(os.path.join(args.out, "layer.csv"), rows, {**header, **matmul})
        plot_layer(os.path.join(args.out, "layer.png"), rows, device_name)

    if "sweep" not in args.skip:
        rows = run_sweep(args, token_points, "tokens", device, rate_of(shapes[0].dtype))
        rows += run_sweep(args, expert_points, "experts", device, rate_of(shapes[-1].dtype))
        for variable, points in (("tokens", token_points), ("experts", expert_points)):
            base = points[0].label() if points else ""
            print_table(f"Sweep over {variable}, forward+backward, around {base}",
                        [r for r in rows if r["sweep"] == variable], SWEEP_COLUMNS)
        _write_csv(os.path.join(args.out, "sweep.csv"), rows, header)
        plot_sweeps(os.path.join(args.out, "sweep.png"), rows, device_name)

    if "maxpool" not in args.skip:
        rows = run_maxpool(args, device)
        if rows:
            print_table("maxpool_align: operator vs PyTorch route (float32)", rows, list(rows[0]))
            _write_csv(os.path.join(args.out, "maxpool.csv"), rows, header)

    if "train" not in args.skip:
        rows = run_training(args, device)
        print_table(f"Training: digits classifier, {args.train_epochs} epoch(s)", rows, list(rows[0]))
        _write_csv(os.path.join(args.out, "train.csv"), rows, header)

    print(f"\nWrote CSV files and plots to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
