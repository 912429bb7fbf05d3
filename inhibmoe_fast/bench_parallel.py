"""Benchmark of expert parallelism on CPU processes: ``python -m inhibmoe_fast.bench_parallel``.

For each group size it starts that many processes on this machine (Gloo), each
with the same number of tokens, and times forward+backward steps of
:class:`~inhibmoe_fast.parallel.ExpertParallelMoE`. The machine's threads are
divided among the processes. With more processes each one runs fewer experts
but exchanges rows twice per pass, so the table shows what the exchange costs.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .layer import InhibitedMoE
from .parallel import ExpertParallelMoE


def _worker(rank: int, world_size: int, store: str, result_path: str, args, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        full = InhibitedMoE(args.dim, args.hidden, args.experts, args.top_k, inhibition=args.inhibition)
        layer = ExpertParallelMoE(full)
        del full
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        grad = torch.randn(args.tokens, args.dim)
        samples = []
        for step in range(args.warmup + args.steps):
            dist.barrier()
            start = time.perf_counter()
            layer(x).backward(grad)
            dist.barrier()
            if step >= args.warmup:
                samples.append((time.perf_counter() - start) * 1e3)
        if rank == 0:
            with open(result_path, "w") as handle:
                handle.write(f"{statistics.median(samples)} {min(samples)} {max(samples)}")
    finally:
        dist.destroy_process_group()
    # With PyTorch 2.14.1, a process that ran a backward through the functional all_to_all
    # sometimes aborts at interpreter exit ("terminate called without an active exception"),
    # after all its work. The worker has written its result here, so it skips that teardown.
    os._exit(0)


def bench_parallel(args) -> list:
    """Time one configuration per group size in ``args.ranks``; return one row per size."""
    total_threads = torch.get_num_threads()
    rows = []
    for world_size in args.ranks:
        if args.experts % world_size:
            raise SystemExit(f"--experts {args.experts} is not a multiple of {world_size} ranks")
        threads = max(1, total_threads // world_size)
        with tempfile.TemporaryDirectory() as folder:
            store, result = os.path.join(folder, "store"), os.path.join(folder, "result")
            mp.spawn(_worker, args=(world_size, store, result, args, threads), nprocs=world_size, join=True)
            with open(result) as handle:
                median, fastest, slowest = (float(v) for v in handle.read().split())
        rows.append({
            "ranks": world_size,
            "threads_per_rank": threads,
            "tokens_per_rank": args.tokens,
            "experts_per_rank": args.experts // world_size,
            "median_ms": median,
            "min_ms": fastest,
            "max_ms": slowest,
            "tokens_per_s": world_size * args.tokens / (median * 1e-3),
        })
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inhibmoe_fast.bench_parallel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4],
                        help="comma-separated group sizes; default 1,2,4")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank; default 2048")
    parser.add_argument("--dim", type=int, default=256, help="model width D; default 256")
    parser.add_argument("--hidden", type=int, default=256, help="expert width F; default 256")
    parser.add_argument("--experts", type=int, default=16, help="experts E, a multiple of every group size; default 16")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token; default 2")
    parser.add_argument("--inhibition", default="local", help="inhibition of the layer; default local")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported); default 5")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first; default 2")
    parser.add_argument("--out", default=None, help="write the table as CSV to this file")
    return parser


def main(argv=None) -> int:
    from .bench import print_table

    args = build_parser().parse_args(argv)
    rows = bench_parallel(args)
    print_table(f"Expert parallelism on CPU processes (Gloo), D={args.dim} F={args.hidden} E={args.experts} "
                f"k={args.top_k}, forward+backward per step", rows, list(rows[0]))
    if args.out:
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
