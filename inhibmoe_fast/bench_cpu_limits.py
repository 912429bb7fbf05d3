"""Where the CPU layer's time goes: ``python -m inhibmoe_fast.bench_cpu_limits``.

It times one forward+backward of the fast layer (``torch`` backend, SwiGLU, no
inhibition) beside measurements that bound it, all at one shape and in one
run. Each row is printed in milliseconds per step and as a fraction of the
square float32 matmul rate measured in the same run:

- ``layer``: the layer as the main bench times it. Every step starts with the
  gradients set to ``None``, as ``optimizer.zero_grad()`` does.
- ``layer, freed memory kept``: the same in a child process whose glibc
  allocator keeps freed memory (``MALLOC_MMAP_THRESHOLD_`` and
  ``MALLOC_TRIM_THRESHOLD_``). Its steps reuse pages instead of faulting in
  fresh ones. Only on Linux with glibc.
- ``expert products, layer dispatch``: the six matrix products of the experts,
  as the layer runs them on the dispatch of its own routing. They are the up
  and down projections, forward, input gradient and weight gradient. Each
  output is allocated anew.
- ``expert products, best case``: the same FLOPs as batched products over equal
  groups of ``N * k / E`` rows, on the same inputs every repeat, into outputs
  allocated once.
- ``fresh pages of one weight gradient``: how much longer writing a gradient of
  ``expert_up``'s size takes into a new tensor than into one already written.

The FLOP rate of a product row counts the expert FLOPs only. The layer rows
count the router as well, as the main bench does.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from .bench import layer_flops
from .dispatch import gather_tokens, plan_dispatch
from .grouped import grouped_linear
from .layer import InhibitedMoE
from .timing import matmul_rate, time_ms

_CPU = torch.device("cpu")
# glibc's allocator settings that keep freed memory in the process (see ``man mallopt``). mallopt
# caps the mmap threshold at 32 MiB, but glibc 2.36 took 2**40 from the environment: the step got faster.
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


def _time_layer_keeping_memory(args) -> Optional[float]:
    """Run :func:`time_layer` in a child process with glibc's allocator keeping freed memory."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    command = [sys.executable, "-m", "inhibmoe_fast.bench_cpu_limits", "--layer-only", *_shape_arguments(args)]
    result = subprocess.run(
        command, env={**os.environ, **_KEEP_MEMORY_ENV}, capture_output=True, text=True, check=True
    )
    return float(result.stdout.split()[-1])


def time_dispatched_products(args) -> float:
    """Return the median ms of the six expert products on the layer's own dispatch, forward and backward."""
    layer = _make_layer(args)
    x = torch.randn(args.tokens, args.dim)
    with torch.no_grad():
        layer(x)
    plan = plan_dispatch(layer.aux.ids, args.experts, None, max_padding=1.0)
    rows = gather_tokens(x, plan, args.top_k)
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
        up = grouped_linear(rows, up_weight, ends, offsets)
        down = grouped_linear(hidden, down_weight, ends, offsets)
        torch.autograd.backward([up, down], [grad_up, grad_down])

    return time_ms(products, _CPU, args.repeats, args.warmup)["median"]


def time_best_case_products(args) -> float:
    """Return the median ms of the expert products as batched products over equal groups, outputs kept."""
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

    return time_ms(products, _CPU, args.repeats, args.warmup)["median"]


def time_fresh_pages(args) -> float:
    """Return how many ms more a copy of ``expert_up``'s size takes into a new tensor than into a written one."""
    source = torch.randn(args.experts, 2 * args.hidden, args.dim)
    written = torch.empty_like(source).copy_(source)
    fresh = time_ms(lambda: torch.empty_like(source).copy_(source), _CPU, args.repeats, args.warmup)["median"]
    reused = time_ms(lambda: written.copy_(source), _CPU, args.repeats, args.warmup)["median"]
    return fresh - reused


def measure(args) -> Dict[str, object]:
    """Run every measurement; return the matmul rate and the table rows."""
    rate = matmul_rate(_CPU, torch.float32, args.matmul_size)
    layer = layer_flops(args.tokens, args.dim, args.hidden, args.experts, args.top_k, "none", None, "swiglu") * 3
    expert = 3 * 2 * args.tokens * args.top_k * args.dim * args.hidden * 3
    rows: List[Dict[str, object]] = [
        {"measurement": "layer", "ms": time_layer(args), "flops": layer},
        {"measurement": "layer, freed memory kept", "ms": _time_layer_keeping_memory(args), "flops": layer},
        {"measurement": "expert products, layer dispatch", "ms": time_dispatched_products(args), "flops": expert},
        {"measurement": "expert products, best case", "ms": time_best_case_products(args), "flops": expert},
        {"measurement": "fresh pages of one weight gradient", "ms": time_fresh_pages(args), "flops": None},
    ]
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
        ms = "not run" if row["ms"] is None else f"{row['ms']:.2f}"
        gflops = f"{row['gflops']:.1f}" if "gflops" in row else ""
        fraction = f"{row['of_matmul_rate']:.2f}" if "of_matmul_rate" in row else ""
        lines.append(f"| {row['measurement']} | {ms} | {gflops} | {fraction} |")
    return "\n".join(lines)


def _shape_arguments(args) -> List[str]:
    return [
        f"--tokens={args.tokens}", f"--dim={args.dim}", f"--hidden={args.hidden}", f"--experts={args.experts}",
        f"--top-k={args.top_k}", f"--repeats={args.repeats}", f"--warmup={args.warmup}",
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
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
    parser.add_argument("--warmup", type=_non_negative, default=3, help="untimed runs before each; default 3")
    parser.add_argument("--matmul-size", type=_positive, default=2048, help="side of the square matmul; default 2048")
    parser.add_argument("--layer-only", action="store_true", help="print only the layer's median ms")
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is larger than --experts {args.experts}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.layer_only:
        print(f"{time_layer(args):.4f}")
        return
    result = measure(args)
    print(
        f"N={args.tokens} D={args.dim} F={args.hidden} E={args.experts} k={args.top_k} float32, SwiGLU, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}"
    )
    print(f"float32 matmul rate, {args.matmul_size}^3: {result['matmul_gflops']:.1f} GFLOP/s\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
