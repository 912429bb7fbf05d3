"""Helpers shared by the tests: paired layers, seeded inputs and mismatch reports."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# `python -m pytest` puts the checkout root on sys.path, where the kernels/ folder would shadow
# the unrelated top-level package named kernels that transformers imports. The tests use the
# installed package (inhibmoe_fast.kernels), so the root is taken off the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _ROOT]

# Without a GPU the Triton kernels run through the interpreter; Triton reads this
# variable when a kernel is defined, which happens on first use of the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Backends that run on CPU tensors here: the Triton one only through the interpreter.
CPU_BACKENDS = ["reference", "torch"]
if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
    CPU_BACKENDS.append("triton")

from inhibmoe_fast import InhibitedMoE, ReferenceMoE, settings, torch_backend

FAST_BACKENDS = ["torch"]

# (dtype, atol, rtol) of the fast path against a reference run in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
}


def make_layers(dim=16, hidden=12, experts=6, k=2, backend="torch", dtype=torch.float64, seed=0, **options):
    """Build a reference layer and a fast layer with the same parameters."""
    torch.manual_seed(seed)
    reference = ReferenceMoE(dim, hidden, experts, k, dtype=dtype, **options)
    fast = InhibitedMoE(dim, hidden, experts, k, backend=backend, dtype=dtype, **options)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def run_layer(layer, x, context=None, grad_seed=1):
    """Run forward and backward; return the output, the input gradients and the parameter gradients."""
    x = x.detach().clone().requires_grad_()
    if context is not None:
        context = [None if c is None else c.detach().clone().requires_grad_() for c in context]
    layer.zero_grad(set_to_none=True)
    y = layer(x, context)
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    (torch.sum(y * grad) + layer.aux.loss).backward()
    grads = {"x": x.grad}
    if context is not None:
        grads.update({f"context[{i}]": c.grad for i, c in enumerate(context) if c is not None})
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return y.detach(), grads


def assert_close(actual, expected, name, atol, rtol):
    """Compare two tensors and report the worst mismatch by index."""
    assert actual is not None, f"{name}: missing"
    assert expected is not None, f"{name}: missing in the reference"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
        return
    error = (actual - expected).abs()
    error = torch.where(torch.isnan(error), torch.full_like(error, float("inf")), error)
    index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    raise AssertionError(
        f"{name}: max error {error.max().item():.3g} at {index}: {actual[index].item()!r} vs {expected[index].item()!r} "
        f"(atol={atol}, rtol={rtol})"
    )


@pytest.fixture(params=["padded", "grouped", "grouped-no-extension"])
def layout(request, monkeypatch):
    """Force the fast path's expert layout and products, so each test covers every combination.

    ``grouped`` runs the extension's CPU operators where they apply, and
    ``grouped-no-extension`` the PyTorch operations they replace.
    """
    ratio = float("inf") if request.param == "padded" else 0.0
    monkeypatch.setattr(torch_backend, "PADDED_LAYOUT_MAX_RATIO", ratio)
    if request.param == "grouped-no-extension":
        monkeypatch.setattr(settings, "_cpu_operators", False)
    return request.param
