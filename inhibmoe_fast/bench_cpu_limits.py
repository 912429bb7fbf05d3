"""Benchmark of the time split of one CPU training step: ``python -m inhibmoe_fast.bench_cpu_limits``.

It times one forward+backward of the fast layer (``torch`` backend, SwiGLU, no
inhibition) beside measurements that bound it, all at one shape and in one
run. Each row is printed in milliseconds per step. Rows that do FLOPs also get
a GFLOP/s rate and its fraction of the square float32 matmul rate, the higher
of two measurements taken before and after the other rows:

- ``layer``: the layer as the main bench times it. Every step starts with the
  gradients set to ``None``, as ``optimizer.zero_grad()`` does.
- ``layer, CPU operators off``: the same with
  ``settings.set_cpu_operators(False)``, so the expert products and SwiGLU run
  as PyTorch operations instead of the extension's operators. The ratio of
  this row to the first is the speed-up those operators give.
- ``layer, freed memory kept``: the layer in a child process whose glibc
  allocator keeps freed memory (``MALLOC_MMAP_THRESHOLD_`` and
  ``MALLOC_TRIM_THRESHOLD_``). Its steps reuse pages instead of faulting in
  fresh ones. Only on Linux with glibc.
- ``expert products, layer dispatch``: the six matrix products of the experts
  on the dispatch of the layer's own routing, in the layout the layer picks.
  They are the up and down projections, forward, input gradient and weight
  gradient. Each output is allocated anew. The rate counts the FLOPs of the
  routed pairs, as the layer rows do, even where the padded layout computes
  padding rows too.
- ``outside the expert products``: the layer row minus the row above, an
  estimate of the time the routing, gathers, SwiGLU and combine take.
- ``expert products, best case``: batched products over equal groups of
  ``N * k // E`` rows (at least one), on the same inputs every repeat, into
  outputs allocated once.
- ``fresh pages of one weight gradient``: how much longer writing a gradient of
  ``expert_up``'s size takes into a new tensor than into one already written.
  It is near zero while that gradient is under 32 MiB, which glibc serves from
  memory it keeps.

The layer rows count the router's FLOPs as well, as the main bench does.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import settings
from .bench import layer_flops
from .dispatch import gather_tokens, plan_dispatch
from .layer import InhibitedMoE
from .torch_backend import PADDED_LAYOUT_MAX_RATIO
from .torch_backend import _linear as expert_linear
from .timing import matmul_rate, time_ms

_CPU = torch.device("cpu")
# glibc's allocator settings that keep freed memory in the process (see ``man mallopt``). mallopt
# caps the mmap threshold at 32 MiB, but glibc 2.36 took 2**40 from the environment, and the step got faster.
_KEEP_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**40), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _make_layer(args) -> InhibitedMoE:
    torch.manual_seed(0)
    return InhibitedMoE(
        args.dim, args.hidden, args.experts, top_k=args.top_k, activation="swiglu", inhibition="none", backend="torch"
    )


def time_layer(args) -> float:
    """Return the median ms of one forward+backward of the layer, gradients reset before each."""
    layer = _make_layer(args)
    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    grad = torch.randn(args.tokens, args.dim)

    def step():
        x.grad = None
        for parameter in layer.parameters():
            parameter.grad = None
        layer(x).backward(grad)

    return time_ms(step, _CPU, args.repeats, args.warmup)["median"]


def time_layer_without_cpu_operators(args) -> float:
    """Return :func:`time_layer` with the extension's CPU operators turned off."""
    enabled = settings.cpu_operators_enabled()
    settings.set_cpu_operators(False)
    try:
        return time_layer(args)
    finally:
        settings.set_cpu_operators(enabled)


def _time_layer_keeping_memory(args) -> Tuple[Optional[float], str]:
    """Run :func:`time_layer` in a child process with glibc's allocator keeping freed memory.

    Returns the median ms, or ``None`` and the reason the row has no time.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None, "not run: needs Linux with glibc"
    command = [
        sys.executable, "-m", "inhibmoe_fast.bench_cpu_limits", "--layer-only", *_shape_arguments(args),
        f"--threads={torch.get_num_threads()}",
    ]
    # `python -m` imports from its working directory first, so the child runs this same copy of the package.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            command, cwd=package_root, env={**os.environ, **_KEEP_MEMORY_ENV}, capture_output=True, text=True,
            check=True,
        )
    except subprocess.CalledProcessError as error:
        print(f"The child process {' '.join(command)} failed with exit code {error.returncode}:", file=sys.stderr)
        print(error.stderr, file=sys.stderr)
        return None, "failed: see the error output"
    return float(result.stdout.split()[-1]), ""


def dispatched_products(args) -> Tuple[Callable[[], None], int, str]:
    """Build the six expert products on the layer's own dispatch, forward and backward.

    Returns the function that runs them, the model FLOPs it is credited with
    (those of the kept pairs, as the layer rows count them) and the layout.
    """
    layer = _make_layer(args)
    x = torch.randn(args.tokens, args.dim)
    with torch.no_grad():
        layer(x)
    plan = plan_dispatch(layer.aux.ids, args.experts, None, PADDED_LAYOUT_MAX_RATIO)
    rows = gather_tokens(x, plan, args.top_k)
    ends = offsets = None
    if plan.layout == "grouped":
        ends_tensor = torch.cumsum(plan.group_sizes, 0)
        ends, offsets = ends_tensor.tolist(), ends_tensor.to(torch.int32)
    rows.requires_grad_()
    hidden = torch.randn(rows.shape[0], args.hidden, requires_grad=True)
    up_weight = layer.expert_up.detach().requires_grad_()
    down_weight = layer.expert_down.detach().requires_grad_()
    grad_up = torch.randn(rows.shape[0], 2 * args.hidden)
    grad_down = torch.randn(rows.shape[0], args.dim)

    def products():
        for tensor in (rows, hidden, up_weight, down_weight):
            tensor.grad = None
        up = expert_linear(rows, up_weight, None, plan.layout, ends, offsets, None)
        down = expert_linear(hidden, down_weight, None, plan.layout, ends, offsets, None)
        torch.autograd.backward([up, down], [grad_up, grad_down])

    kept_pairs = int(plan.kept_counts.sum())
    return products, 3 * 6 * kept_pairs * args.dim * args.hidden, plan.layout


def best_case_products(args) -> Tuple[Callable[[], None], int]:
    """Build the expert products as batched products over equal groups, outputs allocated once.

    Each expert gets ``N * k // E`` rows (at least one). Returns the function
    that runs the products and the FLOPs it performs.
    """
    experts, dim, hidden = args.experts, args.dim, args.hidden
    per_expert = max(1, args.tokens * args.top_k // experts)
    rows = torch.randn(experts, per_expert, dim)
    activations = torch.randn(experts, per_expert, hidden)
    grad_up = torch.randn(experts, per_expert, 2 * hidden)
    grad_down = torch.randn(experts, per_expert, dim)
    up_weight = torch.randn(experts, 2 * hidden, dim)
    down_weight = torch.randn(experts, dim, hidden)
    outputs = [torch.empty_like(t) for t in (grad_up, grad_down, activations, rows, up_weight, down_weight)]

    def products():
        torch.bmm(rows, up_weight.transpose(1, 2), out=outputs[0])
        torch.bmm(activations, down_weight.transpose(1, 2), out=outputs[1])
        torch.bmm(grad_down, down_weight, out=outputs[2])
        torch.bmm(grad_up, up_weight, out=outputs[3])
        torch.bmm(grad_up.transpose(1, 2), rows, out=outputs[4])
        torch.bmm(grad_down.transpose(1, 2), activations, out=outputs[5])

    return products, 3 * 6 * experts * per_expert * dim * hidden


def time_fresh_pages(args) -> float:
    """Return how many ms more a copy of ``expert_up``'s size takes into a new tensor than into a written one."""
    source = torch.randn(args.experts, 2 * args.hidden, args.dim)
    written = torch.empty_like(source).copy_(source)
    fresh = time_ms(lambda: torch.empty_like(source).copy_(source), _CPU, args.repeats, args.warmup)["median"]
    reused = time_ms(lambda: written.copy_(source), _CPU, args.repeats, args.warmup)["median"]
    return fresh - reused


def measure(args) -> Dict[str, object]:
    """Run every measurement; return the matmul rate in GFLOP/s and the table rows."""
    rate = matmul_rate(_CPU, torch.float32, args.matmul_size)
    layer_ms = time_layer(args)
    plain_ms = time_layer_without_cpu_operators(args)
    layer_model_flops = 3 * layer_flops(
        args.tokens, args.dim, args.hidden, args.experts, args.top_k, "none", None, "swiglu"
    )
    kept_ms, kept_status = _time_layer_keeping_memory(args)
    dispatched, dispatched_flops, _ = dispatched_products(args)
    dispatched_ms = time_ms(dispatched, _CPU, args.repeats, args.warmup)["median"]
    best_case, best_case_flops = best_case_products(args)
    rows: List[Dict[str, object]] = [
        {"measurement": "layer", "ms": layer_ms, "flops": layer_model_flops},
        {"measurement": "layer, CPU operators off", "ms": plain_ms, "flops": layer_model_flops},
        {"measurement": "layer, freed memory kept", "ms": kept_ms, "flops": layer_model_flops, "status": kept_status},
        {"measurement": "expert products, layer dispatch", "ms": dispatched_ms, "flops": dispatched_flops},
        {"measurement": "outside the expert products (layer minus the row above)", "ms": layer_ms - dispatched_ms,
         "flops": None},
        {"measurement": "expert products, best case",
         "ms": time_ms(best_case, _CPU, args.repeats, args.warmup)["median"], "flops": best_case_flops},
        {"measurement": "fresh pages of one weight gradient", "ms": time_fresh_pages(args), "flops": None},
    ]
    # A slow moment during one matmul timing would inflate every fraction, so the higher of two is used.
    rate = max(rate, matmul_rate(_CPU, torch.float32, args.matmul_size))
    for row in rows:
        if row["ms"] is not None and row["flops"] is not None:
            row["gflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e9
            row["of_matmul_rate"] = row["gflops"] * 1e9 / rate
    return {"matmul_gflops": rate / 1e9, "rows": rows}


def format_table(result: Dict[str, object]) -> str:
    """Return the rows as a Markdown table."""
    lines = [
        "| measurement | ms per step | GFLOP/s | of matmul rate |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        ms = row.get("status") if row["ms"] is None else f"{row['ms']:.2f}"
        gflops = f"{row['gflops']:.1f}" if "gflops" in row else ""
        fraction = f"{row['of_matmul_rate']:.2f}" if "of_matmul_rate" in row else ""
        lines.append(f"| {row['measurement']} | {ms} | {gflops} | {fraction} |")
    return "\n".join(lines)


def _shape_arguments(args) -> List[str]:
    return [
        f"--tokens={args.tokens}", f"--dim={args.dim}", f"--hidden={args.hidden}", f"--experts={args.experts}",
        f"--top-k={args.top_k}", f"--repeats={args.repeats}", f"--warmup={args.warmup}",
    ]


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected 0 or more")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m inhibmoe_fast.bench_cpu_limits",
        description="Time the CPU layer beside the measurements that bound it, at one shape.",
    )
    parser.add_argument("--tokens", type=_positive, default=4096, help="tokens N; default 4096")
    parser.add_argument("--dim", type=_positive, default=256, help="model width D; default 256")
    parser.add_argument("--hidden", type=_positive, default=256, help="expert width F; default 256")
    parser.add_argument("--experts", type=_positive, default=64, help="experts E; default 64")
    parser.add_argument("--top-k", type=_positive, default=2, help="experts per token k; default 2")
    parser.add_argument("--repeats", type=_positive, default=15, help="timed repeats per measurement; default 15")
    parser.add_argument(
        "--warmup", type=_non_negative, default=3, help="untimed runs before each measurement; default 3"
    )
    parser.add_argument("--threads", type=_positive, help="CPU threads; default: PyTorch's default")
    parser.add_argument("--matmul-size", type=_positive, default=2048, help="side of the square matmul; default 2048")
    parser.add_argument("--layer-only", action="store_true", help="print only the layer's median ms")
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is larger than --experts {args.experts}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.layer_only:
        print(f"{time_layer(args):.4f}")
        return
    result = measure(args)
    print(
        f"N={args.tokens} D={args.dim} F={args.hidden} E={args.experts} k={args.top_k} float32, SwiGLU, "
        f"threads: {torch.get_num_threads()}; torch {torch.__version__}"
    )
    print(f"float32 matmul rate, {args.matmul_size}^3: {result['matmul_gflops']:.1f} GFLOP/s\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
