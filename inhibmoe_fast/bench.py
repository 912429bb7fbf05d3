"""Benchmark of the inhibited MoE layer: ``python -m inhibmoe_fast.bench``.

It runs four parts on the device it finds (or the one given):

1. parity: the fast layer against the reference in float64 on a few shapes,
   with the max error of the output and of every gradient;
2. layer: forward, backward and forward+backward times and activation memory
   of each backend and inhibition, with the model FLOP rate as a fraction of
   the device's matmul rate measured in the same run;
3. maxpool: the ``maxpool_align`` operator against the PyTorch route;
4. train: one epoch of a small digit classifier with one MoE layer, fast layer
   against reference, with the time per epoch and the test accuracy.

Tables are printed; CSV files and PNG plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
from typing import Dict, List

import torch

from .bench_maxpool import bench_maxpool, parse_sizes
from .layer import InhibitedMoE
from .reference import ReferenceMoE
from .timing import activation_bytes, matmul_rate, time_split_ms

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


def run_layer(args, device: torch.device, dtype: torch.dtype, rate: float) -> List[Dict[str, object]]:
    """Time every backend and inhibition on the configured shape; return one row per (backend, inhibition, pass)."""
    rows = []
    cases = [(inhibition, backend) for inhibition in args.inhibitions for backend in args.backends]
    reference_times: Dict[str, Dict[str, float]] = {}
    for inhibition, backend in _progress(cases, "layer", args.progress):
        gate_rank = args.gate_rank if inhibition in ("local", "global") else None
        options = dict(inhibition=inhibition, gate_rank=gate_rank)
        if inhibition == "global":
            options["context_dims"] = (args.dim,)
        torch.manual_seed(0)
        layer = InhibitedMoE(args.dim, args.hidden, args.experts, args.top_k, backend=backend, device=device, dtype=dtype,
                             **options)
        x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
        context = [torch.randn(args.tokens // 2 + 1, args.dim, device=device, dtype=dtype)] if inhibition == "global" else None
        grad = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)

        def forward():
            return layer(x, context)

        def backward(output):
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            output.backward(grad)

        times = time_split_ms(forward, backward, device, args.repeats, args.warmup)
        memory = activation_bytes(forward, layer, device)
        flops = layer_flops(args.tokens, args.dim, args.hidden, args.experts, args.top_k, inhibition, gate_rank, "swiglu",
                            options.get("context_dims", ()))
        if backend == "reference":
            reference_times[inhibition] = {p: t["median"] for p, t in times.items()}
        for name, t in times.items():
            pass_flops = flops * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[name]
            rows.append({
                "backend": backend, "inhibition": inhibition, "pass": name,
                "median_ms": t["median"], "min_ms": t["min"], "max_ms": t["max"],
                "gflops": pass_flops / (t["median"] * 1e-3) / 1e9,
                "of_matmul_rate": pass_flops / (t["median"] * 1e-3) / rate,
                "activation_mib": memory / 2**20,
            })
    for row in rows:
        baseline = reference_times.get(row["inhibition"], {}).get(row["pass"])
        row["speedup_vs_reference"] = baseline / row["median_ms"] if baseline else None
    return rows


def run_maxpool(args, device: torch.device) -> List[Dict[str, object]]:
    """Benchmark ``maxpool_align`` against the PyTorch route, when the benchmark module is present."""
    try:
        return bench_maxpool(str(device), torch.float32, args.maxpool_sizes, args.repeats)
    except RuntimeError as error:  # the extension is not built
        print(f"\nmaxpool_align: skipped, {error}")
        return []


def run_training(args, device: torch.device) -> List[Dict[str, object]]:
    """Train a digit classifier with one MoE layer for ``args.train_epochs`` epochs per backend."""
    from .train_digits import train_digits

    rows = []
    for backend in _progress(args.backends, "train", args.progress):
        rows.append(train_digits(backend, device, epochs=args.train_epochs, seed=0))
    return rows


def plot(path: str, layer_rows: List[Dict[str, object]], device_name: str) -> None:
    """Draw latency per pass and activation memory per backend and inhibition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["inhibition"], r["backend"]) for r in layer_rows})
    passes = ["fwd", "bwd", "fwd+bwd"]
    figure, (latency_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(passes)
    for i, name in enumerate(passes):
        values = [next(r["median_ms"] for r in layer_rows if (r["inhibition"], r["backend"]) == label and r["pass"] == name)
                  for label in labels]
        latency_axis.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    latency_axis.set_xticks([j + width for j in range(len(labels))])
    latency_axis.set_xticklabels([f"{inh}\n{backend}" for inh, backend in labels])
    latency_axis.set_ylabel("median time (ms)")
    latency_axis.set_yscale("log")
    latency_axis.set_title(f"latency on {device_name}")
    latency_axis.legend()
    memory = [next(r["activation_mib"] for r in layer_rows if (r["inhibition"], r["backend"]) == label) for label in labels]
    memory_axis.bar(range(len(labels)), memory)
    memory_axis.set_xticks(range(len(labels)))
    memory_axis.set_xticklabels([f"{inh}\n{backend}" for inh, backend in labels])
    memory_axis.set_ylabel("activation memory kept for backward (MiB)")
    memory_axis.set_title("memory")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inhibmoe_fast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available); default auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                        help="dtype of the timed layers; default float32")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens N per call; default 4096")
    parser.add_argument("--dim", type=int, default=256, help="model width D; default 256")
    parser.add_argument("--hidden", type=int, default=256, help="expert width F; default 256")
    parser.add_argument("--experts", type=int, default=64, help="experts E; default 64")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k; default 2")
    parser.add_argument("--gate-rank", type=int, default=None, help="rank of the inhibition gate; default full rank")
    parser.add_argument("--inhibitions", type=lambda s: s.split(","), default=["none", "local"],
                        help="comma-separated inhibitions to time; default none,local")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "reference"],
                        help="comma-separated backends to compare; default torch,reference")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported); default 5")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement; default 2")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the square matmul that measures the device rate; default 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--maxpool-sizes", type=parse_sizes, default=parse_sizes("4096x256x1024,65536x1024x4096"),
                        help="maxpool_align sizes as N_INxCxN_OUT[,...]; default 4096x256x1024,65536x1024x4096")
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs of the digits training run; default 1")
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[],
                        help="comma-separated parts to skip: parity, layer, maxpool, train")
    parser.add_argument("--out", default="results", help="folder for the CSV files and plots; default ./results")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    device_name = _device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = {"device": device_name, "torch": torch.__version__, "date": stamp}
    print(f"inhibmoe_fast bench on {device_name}; torch {torch.__version__}; {stamp}")

    if "parity" not in args.skip:
        rows = run_parity(device)
        print_table("Parity: fast vs reference, float64 (max abs error)", rows,
                     ["shape", "tensor", "max_abs_error", "ids_equal"])
        _write_csv(os.path.join(args.out, "parity.csv"), rows, header)

    if "layer" not in args.skip:
        size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
        rate = matmul_rate(device, dtype, size)
        print(f"\n{args.dtype} matmul rate, {size}x{size}x{size}: {rate / 1e9:.1f} GFLOP/s")
        rows = run_layer(args, device, dtype, rate)
        title = (f"Layer: N={args.tokens} D={args.dim} F={args.hidden} E={args.experts} k={args.top_k} "
                 f"{args.dtype} swiglu, gate rank {args.gate_rank or 'full'}")
        print_table(title, rows, ["inhibition", "backend", "pass", "median_ms", "min_ms", "max_ms", "gflops",
                                   "of_matmul_rate", "speedup_vs_reference", "activation_mib"])
        shape = {"tokens": args.tokens, "dim": args.dim, "hidden": args.hidden, "experts": args.experts,
                 "top_k": args.top_k, "dtype": args.dtype, "matmul_gflops": rate / 1e9}
        _write_csv(os.path.join(args.out, "layer.csv"), rows, {**header, **shape})
        plot(os.path.join(args.out, "layer.png"), rows, device_name)

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
