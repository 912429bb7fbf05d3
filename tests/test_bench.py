"""The benchmark command runs end to end on a tiny configuration and writes its files."""

from __future__ import annotations

import csv
import os

from inhibmoe_fast import bench


def test_bench_writes_tables_and_plot(tmp_path, capsys):
    out = tmp_path / "results"
    code = bench.main([
        "--device", "cpu", "--tokens", "64", "--dim", "16", "--hidden", "8", "--experts", "4", "--top-k", "2",
        "--inhibitions", "none,local,global", "--repeats", "1", "--warmup", "0", "--matmul-size", "64",
        "--maxpool-sizes", "40x8x16", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    for name in ("parity.csv", "layer.csv", "layer.png", "train.csv"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "layer.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["backend"], r["inhibition"]) for r in rows} == {
        (b, i) for b in ("torch", "reference") for i in ("none", "local", "global")
    }
    assert all(float(r["median_ms"]) > 0 for r in rows)
    with open(out / "parity.csv") as handle:
        parity = list(csv.DictReader(handle))
    assert all(float(r["max_abs_error"]) < 1e-10 for r in parity)
    assert all(r["ids_equal"] == "True" for r in parity)
    printed = capsys.readouterr().out
    assert "matmul rate" in printed
    assert "Training: digits classifier" in printed


def test_bench_rejects_bad_size():
    import argparse

    import pytest

    with pytest.raises(argparse.ArgumentTypeError, match="size '12x3' is invalid"):
        bench.parse_sizes("12x3")
