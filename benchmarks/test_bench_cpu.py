"""pytest-benchmark timings of every CPU provider on a small shape, forward+backward.

Run with ``.venv/bin/python -m pytest benchmarks/ --benchmark-only``; ``make test``
collects only ``tests/``, so these do not run there. Compare two runs with
``--benchmark-autosave`` and ``pytest-benchmark compare``.
"""

from __future__ import annotations

import pytest
import torch

from inhibmoe_fast.bench import Shape, build_providers

SHAPE = Shape(tokens=1024, dim=128, hidden=128, experts=16, top_k=2, dtype="float32", gate_rank=None, low_rank=16)
DEVICE = torch.device("cpu")
BASELINES = ("reference", "mixtral-style")
INHIBITIONS = ("none", "local", "local-lowrank", "global")


def _providers():
    return {p.name: p for p in build_providers(SHAPE, DEVICE, BASELINES, ["torch"], INHIBITIONS)}


PROVIDER_NAMES = list(_providers())


@pytest.fixture(scope="module")
def providers():
    return _providers()


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_forward_backward(benchmark, providers, name):
    provider = providers[name]
    benchmark.group = f"fwd+bwd {SHAPE.label()}"
    benchmark.pedantic(lambda: provider.backward(provider.forward()), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_forward(benchmark, providers, name):
    provider = providers[name]
    benchmark.group = f"fwd {SHAPE.label()}"
    with torch.no_grad():
        benchmark.pedantic(provider.forward, rounds=5, warmup_rounds=1)
