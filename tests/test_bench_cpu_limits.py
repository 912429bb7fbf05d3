"""The CPU limits benchmark: its rows, the FLOPs it credits, its child process and its arguments."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import inhibmoe_fast
from inhibmoe_fast import bench_cpu_limits, grouped

TINY = ["--tokens", "32", "--dim", "16", "--hidden", "8", "--experts", "4", "--top-k", "2", "--repeats", "1",
        "--warmup", "0", "--matmul-size", "32"]
ROW_NAMES = [
    "layer", "layer, CPU operators off", "layer, freed memory kept", "expert products, layer dispatch",
    "outside the expert products (layer minus the row above)", "expert products, best case",
    "fresh pages of one weight gradient",
]
HAS_GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _flops_done(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def test_limits_measure_every_row():
    result = bench_cpu_limits.measure(bench_cpu_limits.parse_args(TINY))
    rows = {row["measurement"]: row for row in result["rows"]}
    assert list(rows) == ROW_NAMES
    assert result["matmul_gflops"] > 0
    tokens, dim, hidden, experts, k = 32, 16, 8, 4, 2
    assert rows["layer"]["flops"] == 3 * (2 * tokens * dim * experts + 6 * tokens * k * dim * hidden)
    layer = rows["layer"]
    assert layer["gflops"] == pytest.approx(layer["flops"] / (layer["ms"] / 1e3) / 1e9)
    assert layer["of_matmul_rate"] == pytest.approx(layer["gflops"] / result["matmul_gflops"])
    assert rows["layer, CPU operators off"]["flops"] == layer["flops"]
    assert inhibmoe_fast.settings.cpu_operators_enabled(), "the row restores the setting"
    if HAS_GLIBC:
        assert rows["layer, freed memory kept"]["ms"] > 0
    outside = rows["outside the expert products (layer minus the row above)"]
    assert outside["ms"] == pytest.approx(layer["ms"] - rows["expert products, layer dispatch"]["ms"])
    assert isinstance(rows["fresh pages of one weight gradient"]["ms"], float)


def test_limits_use_higher_matmul_rate(monkeypatch):
    measured = iter([1e9, 4e9])
    monkeypatch.setattr(bench_cpu_limits, "matmul_rate", lambda device, dtype, size: next(measured))
    result = bench_cpu_limits.measure(bench_cpu_limits.parse_args(TINY))
    assert result["matmul_gflops"] == 4.0
    layer = result["rows"][0]
    assert layer["of_matmul_rate"] == pytest.approx(layer["gflops"] / 4.0)


@pytest.mark.parametrize(
    "shape",
    [["--tokens", "64", "--experts", "16"],  # uneven groups: grouped layout
     ["--tokens", "64", "--experts", "1", "--top-k", "1"],  # one expert: padded layout
     ["--tokens", "40", "--experts", "3", "--dim", "10", "--hidden", "13"]],  # odd widths
)
def test_limits_credit_the_flops_done(shape, monkeypatch):
    # The FLOP counter counts neither grouped_mm nor the extension's grouped operators, so the
    # grouped layout runs its loop of mm here.
    monkeypatch.setattr(grouped, "_use_grouped_mm", lambda *args: False)
    monkeypatch.setattr(grouped, "MIN_GROUPS_PER_THREAD", float("inf"))
    args = bench_cpu_limits.parse_args(["--dim", "16", "--hidden", "8", *shape])
    products, credited, layout = bench_cpu_limits.dispatched_products(args)
    if layout == "grouped":
        assert _flops_done(products) == credited
    else:
        # The padded layout also multiplies its padding rows, which the rate does not credit.
        assert _flops_done(products) >= credited
    products, credited = bench_cpu_limits.best_case_products(args)
    assert _flops_done(products) == credited


def test_limits_best_case_credits_rounded_groups():
    args = bench_cpu_limits.parse_args(["--tokens", "100", "--top-k", "3", "--experts", "64"])
    products, credited = bench_cpu_limits.best_case_products(args)
    assert credited == 3 * 6 * 64 * (300 // 64) * 256 * 256
    assert _flops_done(products) == credited


def test_limits_fresh_pages_subtract_the_reused_copy(monkeypatch):
    def fake_time_ms(function, device, repeats, warmup):
        first, second = function(), function()
        # A copy into new tensors returns two storages, a copy into the written tensor one.
        return {"median": 1.0 if first.data_ptr() == second.data_ptr() else 4.0}

    monkeypatch.setattr(bench_cpu_limits, "time_ms", fake_time_ms)
    assert bench_cpu_limits.time_fresh_pages(bench_cpu_limits.parse_args(TINY)) == 3.0


def test_limits_child_keeps_freed_memory(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        return subprocess.CompletedProcess(command, 0, stdout="12.5000\n", stderr="")

    monkeypatch.setattr(bench_cpu_limits.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_cpu_limits.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(bench_cpu_limits.sys, "platform", "linux")
    args = bench_cpu_limits.parse_args(TINY)
    assert bench_cpu_limits._time_layer_keeping_memory(args) == (12.5, "")
    command, kwargs = calls[0]
    assert command[1:4] == ["-m", "inhibmoe_fast.bench_cpu_limits", "--layer-only"]
    assert "--tokens=32" in command
    assert "--hidden=8" in command
    assert f"--threads={torch.get_num_threads()}" in command
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        assert int(kwargs["env"][name]) > 32 * 2**20
    assert kwargs["cwd"] == os.path.dirname(os.path.dirname(os.path.abspath(inhibmoe_fast.__file__)))


def test_limits_child_failure_is_reported(monkeypatch, capsys):
    def failing_run(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, output="", stderr="ImportError: no module\n")

    monkeypatch.setattr(bench_cpu_limits.subprocess, "run", failing_run)
    monkeypatch.setattr(bench_cpu_limits.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(bench_cpu_limits.sys, "platform", "linux")
    ms, status = bench_cpu_limits._time_layer_keeping_memory(bench_cpu_limits.parse_args(TINY))
    assert ms is None
    assert status.startswith("failed")
    err = capsys.readouterr().err
    assert "failed with exit code 1" in err
    assert "ImportError: no module" in err


@pytest.mark.skipif(not HAS_GLIBC, reason="the child process runs only on Linux with glibc")
def test_limits_child_prints_its_time():
    ms, status = bench_cpu_limits._time_layer_keeping_memory(bench_cpu_limits.parse_args(TINY))
    assert ms > 0
    assert status == ""


def test_limits_print_the_table(capsys):
    bench_cpu_limits.main(TINY)
    out = capsys.readouterr().out
    assert "float32 matmul rate, 32^3" in out
    for name in ROW_NAMES:
        assert f"| {name} |" in out


def test_limits_layer_only_prints_time(capsys):
    bench_cpu_limits.main(TINY + ["--layer-only", "--threads", "1"])
    assert float(capsys.readouterr().out) > 0


@pytest.mark.parametrize(
    "argv, message",
    [(["--top-k", "5", "--experts", "4"], "--top-k 5 is larger than --experts 4"),
     (["--tokens", "0"], "0 is not a positive integer"),
     (["--tokens", "1.5"], "'1.5' is not an integer"),
     (["--warmup", "-1"], "-1 is negative")],
)
def test_limits_reject_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_cpu_limits.parse_args(argv)
    assert message in capsys.readouterr().err
