"""The CPU limits benchmark runs on a tiny shape and fills every row of its table."""

from __future__ import annotations

import platform
import sys

import pytest

from inhibmoe_fast import bench_cpu_limits

TINY = ["--tokens", "32", "--dim", "16", "--hidden", "8", "--experts", "4", "--top-k", "2", "--repeats", "1",
        "--warmup", "0", "--matmul-size", "32"]


def test_limits_measure_every_row():
    result = bench_cpu_limits.measure(bench_cpu_limits.parse_args(TINY))
    rows = {row["measurement"]: row for row in result["rows"]}
    assert list(rows) == [
        "layer", "layer, freed memory kept", "expert products, layer dispatch", "expert products, best case",
        "fresh pages of one weight gradient",
    ]
    assert result["matmul_gflops"] > 0
    child_row = rows["layer, freed memory kept"]
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert child_row["ms"] is not None
    timed = [row for row in rows.values() if row["flops"] is not None and row["ms"] is not None]
    assert len(timed) >= 3
    for row in timed:
        assert row["ms"] > 0, row
        assert row["gflops"] > 0, row
        assert row["of_matmul_rate"] == pytest.approx(row["gflops"] / result["matmul_gflops"])
    assert rows["expert products, best case"]["flops"] == 3 * 2 * 32 * 2 * 16 * 8 * 3


def test_limits_print_the_table(capsys):
    bench_cpu_limits.main(TINY)
    out = capsys.readouterr().out
    assert "float32 matmul rate, 32^3" in out
    assert "| expert products, best case |" in out
    assert "| fresh pages of one weight gradient |" in out


def test_limits_layer_only_prints_time(capsys):
    bench_cpu_limits.main(TINY + ["--layer-only"])
    assert float(capsys.readouterr().out) > 0


@pytest.mark.parametrize(
    "argv, message",
    [(["--top-k", "5", "--experts", "4"], "--top-k 5 is larger than --experts 4"),
     (["--tokens", "0"], "0 is not a positive integer"),
     (["--warmup", "-1"], "-1 is negative")],
)
def test_limits_reject_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_cpu_limits.parse_args(argv)
    assert message in capsys.readouterr().err
