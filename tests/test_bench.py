"""The benchmark command runs end to end on a tiny configuration and writes its files."""

from __future__ import annotations

import argparse
import csv
import os
import re

import pytest
import torch

from inhibmoe_fast import bench, bench_maxpool

TINY = ["--device", "cpu", "--tokens", "64", "--dim", "16", "--hidden", "8", "--experts", "4", "--top-k", "2",
        "--low-rank", "4", "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--no-progress"]


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_bench_writes_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "results"
    code = bench.main(TINY + [
        "--baselines", "reference,mixtral-style", "--token-sweep", "32,64", "--expert-sweep", "2,4x1",
        "--sweep-repeats", "1", "--maxpool-sizes", "40x8x16", "--out", str(out),
    ])
    assert code == 0
    for name in ("parity.csv", "layer.csv", "layer.png", "sweep.csv", "sweep.png", "train.csv"):
        assert os.path.getsize(out / name) > 0, name

    rows = _read_csv(out / "layer.csv")
    providers = {r["provider"] for r in rows}
    assert providers == {"reference", "mixtral-style", "fast[torch] none", "fast[torch] local",
                         "fast[torch] local r=4", "fast[torch] global"}
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"]) for r in rows)
    assert all(float(r["activation_mib"]) > 0 for r in rows)
    assert all(float(r["speedup_vs_reference"]) > 0 for r in rows)
    assert all(r["device"] and r["torch"] == torch.__version__ and r["date"] for r in rows)
    reference = [r for r in rows if r["provider"] == "reference"]
    assert all(float(r["speedup_vs_reference"]) == 1.0 for r in reference)

    sweep = _read_csv(out / "sweep.csv")
    assert {(r["sweep"], r["tokens"]) for r in sweep if r["sweep"] == "tokens"} == {("tokens", "32"), ("tokens", "64")}
    assert {(r["experts"], r["top_k"]) for r in sweep if r["sweep"] == "experts"} == {("2", "2"), ("4", "1")}
    assert {r["provider"] for r in sweep} == {"reference", "mixtral-style", "fast[torch] none", "fast[torch] local"}

    parity = _read_csv(out / "parity.csv")
    assert all(float(r["max_abs_error"]) < 1e-10 for r in parity)
    assert all(r["ids_equal"] == "True" for r in parity)
    printed = capsys.readouterr().out
    assert "matmul rate" in printed
    assert "Sweep over tokens" in printed
    assert "Training: digits classifier" in printed


@pytest.mark.parametrize("first, second, used", [(1e9, 4e9, 4e9), (4e9, 1e9, 4e9)])
def test_bench_uses_higher_matmul_rate(tmp_path, monkeypatch, first, second, used):
    measured = iter([first, second])
    monkeypatch.setattr(bench, "matmul_rate", lambda device, dtype, size: next(measured))
    out = tmp_path / "results"
    code = bench.main(TINY + ["--baselines", "none", "--inhibitions", "none", "--skip", "parity,sweep,maxpool,train",
                              "--out", str(out)])
    assert code == 0
    rows = _read_csv(out / "layer.csv")
    assert float(rows[0]["matmul_gflops_float32"]) == used / 1e9
    for row in rows:
        assert float(row["of_matmul_rate"]) == pytest.approx(float(row["gflops"]) * 1e9 / used)


def test_bench_times_parts_alone(tmp_path):
    from inhibmoe_fast.kernels import routing as kernels

    if not torch.cuda.is_available() and not kernels.INTERPRETED:
        pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set and no GPU is present")
    out = tmp_path / "results"
    code = bench.main(TINY + ["--baselines", "none", "--inhibitions", "none", "--parts",
                              "--skip", "parity,sweep,maxpool,train", "--out", str(out)])
    assert code == 0
    rows = _read_csv(out / "layer.csv")
    assert {r["provider"] for r in rows} == {"fast[torch] none", "part: route (triton, local)",
                                             "part: experts (torch)", "part: experts+combine (triton)",
                                             "part: maxpool_align"}
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_bench_rejects_unknown_provider():
    with pytest.raises(SystemExit, match="unknown provider"):
        bench.main(TINY + ["--inhibitions", "lokal", "--skip", "parity,layer,sweep,maxpool,train"])


def test_bench_rejects_bad_size():
    with pytest.raises(argparse.ArgumentTypeError, match="size '12x3' is invalid"):
        bench.parse_sizes("12x3")


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--skip", "trian"], r"argument --skip: unknown name\(s\) trian"),
        (["--backends", "trition"], r"argument --backends: unknown name\(s\) trition"),
        (["--token-sweep", "0"], r"argument --token-sweep: list '0' is invalid"),
        (["--repeats", "0"], r"argument --repeats: 0 is invalid; expected an integer >= 1"),
        (["--warmup", "-1"], r"argument --warmup: -1 is invalid; expected an integer >= 0"),
        (["--tokens", "-3"], r"argument --tokens: -3 is invalid"),
        (["--expert-sweep", "4x8"], r"argument --expert-sweep: expert point '4x8' is invalid"),
        (["--experts", "1", "--top-k", "2"], r"top_k=2 is larger than experts=1"),
        (["--expert-sweep", "1"], r"top_k=2 is larger than experts=1"),
        (["--backends", ""], r"argument --backends: empty list"),
        (["--inhibitions", ""], r"--inhibitions is empty"),
        (["--dtype", "float64", "--backends", "torch,triton"], r"--backends triton takes float32"),
        (["--maxpool-sizes", "0x8x16"], r"argument --maxpool-sizes: size '0x8x16' is invalid"),
    ],
)
def test_bench_rejects_bad_options(args, pattern, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args + ["--skip", "parity,layer,sweep,maxpool,train", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:x"])
def test_bench_rejects_bad_device(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", device, "--skip", "parity,layer,sweep,maxpool,train"])
    assert exit_info.value.code == 2
    assert f"--device {device!r} is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("args,pattern", [(["--repeats", "0"], r"--repeats 0 is invalid"),
                                          (["--device", "foo"], r"--device 'foo' is invalid"),
                                          (["--sizes", "8x0x4"], r"size '8x0x4' is invalid")])
def test_bench_maxpool_rejects_bad_options(args, pattern, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_maxpool.main(args)
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_bench_triton_on_cpu_needs_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bench, "triton_available", lambda: True)
    with pytest.raises(SystemExit):
        bench.main(["--backends", "triton", "--device", "cpu", "--skip", "parity,layer,sweep,maxpool,train"])
    assert "needs TRITON_INTERPRET=1" in capsys.readouterr().err
