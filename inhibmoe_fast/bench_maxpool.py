"""Benchmark of the ``maxpool_align`` operator against the PyTorch route.

The PyTorch route is ``ops._maxpool_align_torch``: transpose, then
``adaptive_max_pool1d``, then transpose back. Each size is timed for the
forward pass, the backward pass alone and both. On the CPU a time is the
median of ``repeats`` runs of ``time.perf_counter`` after one warm-up run. On
CUDA it is the median of ``triton.testing.do_bench``, or of a synchronised
``perf_counter`` loop when Triton is missing.

Run ``python -m inhibmoe_fast.bench_maxpool --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _maxpool_op, ops

DEFAULT_SIZES: List[Tuple[int, int, int]] = [(4096, 256, 1024), (1024, 256, 4096), (65536, 1024, 4096)]
PASSES = ("fwd", "bwd", "fwd+bwd")


def _median_ms(
    function: Callable[[], object], device: torch.device, repeats: int, grad_to_none: Sequence[torch.Tensor]
) -> float:
    """Return the median time of ``function`` in milliseconds, as the module docstring describes."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(function, grad_to_none=list(grad_to_none), return_mode="median"))

    def run() -> None:
        for tensor in grad_to_none:
            tensor.grad = None
        function()

    run()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _time_passes(
    pool: Callable[[torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    n_out: int,
    grad_values: torch.Tensor,
    repeats: int,
) -> Dict[str, float]:
    """Time the forward, the backward alone and both for one implementation."""
    leaf = x.detach().requires_grad_()

    def forward() -> None:
        with torch.no_grad():
            pool(x, n_out)

    def forward_backward() -> None:
        pool(leaf, n_out)[0].backward(grad_values)

    values, _ = pool(leaf, n_out)

    def backward() -> None:
        values.backward(grad_values, retain_graph=True)

    times = {
        "fwd": _median_ms(forward, x.device, repeats, []),
        "bwd": _median_ms(backward, x.device, repeats, [leaf]),
        "fwd+bwd": _median_ms(forward_backward, x.device, repeats, [leaf]),
    }
    del values
    leaf.grad = None
    return times


def bench_maxpool(
    device: str, dtype: torch.dtype, sizes: List[Tuple[int, int, int]], repeats: int
) -> List[Dict[str, object]]:
    """Time ``maxpool_align`` against the PyTorch route for each ``(N_in, C, n_out)`` in ``sizes``.

    Returns one row per size and pass (``fwd``, ``bwd``, ``fwd+bwd``) with the keys
    ``size``, ``pass``, ``op_ms``, ``torch_ms`` and ``speedup`` (``torch_ms / op_ms``).

    Raises:
        RuntimeError: the extension ``inhibmoe_fast._C`` is not built, so there is no operator to time.
    """
    if not _maxpool_op.AVAILABLE:
        raise RuntimeError(
            f"inhibmoe_fast._C failed to import ({_maxpool_op.IMPORT_ERROR}); reinstall the package to build it"
        )
    torch_device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    rows: List[Dict[str, object]] = []
    for n_in, width, n_out in sizes:
        x = torch.randn(n_in, width, generator=generator).to(device=torch_device, dtype=dtype)
        grad_values = torch.randn(n_out, width, generator=generator).to(device=torch_device, dtype=dtype)
        op_times = _time_passes(torch.ops.inhibmoe_fast.maxpool_align, x, n_out, grad_values, repeats)
        torch_times = _time_passes(ops._maxpool_align_torch, x, n_out, grad_values, repeats)
        for name in PASSES:
            rows.append(
                {
                    "size": f"N_in={n_in},C={width},n_out={n_out}",
                    "pass": name,
                    "op_ms": round(op_times[name], 3),
                    "torch_ms": round(torch_times[name], 3),
                    "speedup": round(torch_times[name] / op_times[name], 2),
                }
            )
        del x, grad_values
    return rows


def parse_sizes(text: str) -> List[Tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(
                f"size {item!r} is invalid; expected N_INxCxN_OUT of positive integers, e.g. 65536x1024x4096")
        sizes.append(tuple(int(part) for part in parts))
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on; default cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16", "bfloat16"],
                        help="dtype of the input; default float32")
    parser.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                        help="sizes as N_INxCxN_OUT[,...]; default 4096x256x1024,1024x256x4096,65536x1024x4096")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; default 5")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid; expected a positive integer")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is invalid; expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r} is invalid; expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")

    rows = bench_maxpool(args.device, getattr(torch, args.dtype), args.sizes, args.repeats)
    from .bench import print_table

    title = (f"maxpool_align vs PyTorch route: {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}")
    print_table(title, rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
