"""The extension's SwiGLU CPU operators against float64 PyTorch and against the PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES, assert_close
from inhibmoe_fast import _extension, activations, grouped, settings

pytestmark = pytest.mark.skipif(not _extension.AVAILABLE, reason="inhibmoe_fast._C is not built")

ops = torch.ops.inhibmoe_fast


def _expected(projected: torch.Tensor, grad_hidden: torch.Tensor):
    """Return SwiGLU and its input gradient by PyTorch autograd in float64."""
    projected = projected.double().requires_grad_()
    gate, up = projected.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    (grad,) = torch.autograd.grad(hidden, projected, grad_hidden.double())
    return hidden.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 7, 64])
def test_matches_float64(dtype, width):
    generator = torch.Generator().manual_seed(width)
    projected = (3 * torch.randn(37, 2 * width, generator=generator, dtype=torch.float64)).to(dtype)
    grad_hidden = torch.randn(37, width, generator=generator, dtype=torch.float64).to(dtype)
    hidden, grad = _expected(projected, grad_hidden)
    # bfloat16 keeps 8 significant bits: results are rounded to within 2**-8 relative.
    atol, rtol = TOLERANCES.get(dtype, (1e-2, 1e-2))
    assert ops.swiglu(projected).dtype == dtype
    assert_close(ops.swiglu(projected).double(), hidden, "hidden", atol, rtol)
    assert_close(ops.swiglu_backward(grad_hidden, projected).double(), grad, "grad of projected", atol, rtol)


def test_float32_exp_over_the_whole_range():
    """The float32 loop's own exp keeps silu within a few units in the last place everywhere."""
    gate = torch.linspace(-90, 90, 200_001, dtype=torch.float32)
    projected = torch.stack([gate, torch.ones_like(gate)], dim=1)
    got = ops.swiglu(projected)[:, 0].double()
    expected = F.silu(gate.double())
    error = (got - expected).abs()
    inside = gate.abs() <= 88.72
    # Inside the float range of exp the relative error stays within 2 units in the last place (2**-23 each).
    assert (error[inside] / expected[inside].abs().clamp_min(1e-38)).max().item() < 2 * 2.0**-23
    # Beyond, exp overflows to inf, as in float32 PyTorch, and silu of large negative values becomes -0.0.
    assert error[~inside].max().item() < 1e-36


def test_special_values():
    gate = torch.tensor([0.0, -0.0, 1e-30, 20.0, -20.0, 88.5, -88.5, -88.5, -88.72, 100.0, -100.0, float("inf"),
                         float("-inf"), float("nan")])
    # The linear half is 2 except next to silu(-88.5) and silu(-88.72), tiny values that an
    # infinite or huge factor must still scale.
    up = torch.tensor([2.0] * 6 + [float("inf"), 3e38, 3e38] + [2.0] * 5)
    projected = torch.stack([gate, up], dim=1)
    grad_hidden = torch.ones(gate.shape[0], 1)
    expected_hidden = F.silu(gate) * up
    hidden = ops.swiglu(projected)[:, 0]
    grad = ops.swiglu_backward(grad_hidden, projected)
    leaf = projected.clone().requires_grad_()
    (F.silu(leaf[:, :1]) * leaf[:, 1:]).backward(grad_hidden)
    torch.testing.assert_close(hidden, expected_hidden, atol=0, rtol=4e-7, equal_nan=True)
    torch.testing.assert_close(grad, leaf.grad, atol=0, rtol=4e-7, equal_nan=True)


def test_strided_inputs():
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 24, generator=generator)
    projected = wide[:, ::2]
    grad_hidden = torch.randn(6, 9, generator=generator).t()
    assert torch.equal(ops.swiglu(projected), ops.swiglu(projected.contiguous()))
    assert torch.equal(ops.swiglu_backward(grad_hidden, projected),
                       ops.swiglu_backward(grad_hidden.contiguous(), projected.contiguous()))


def test_empty_rows():
    assert ops.swiglu(torch.empty(0, 8)).shape == (0, 4)
    assert ops.swiglu_backward(torch.empty(0, 4), torch.empty(0, 8)).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_operators_match_pytorch_path(dtype, monkeypatch):
    """swiglu() gives the same values and gradients with and without the operators."""
    generator = torch.Generator().manual_seed(5)
    projected = torch.randn(50, 12, generator=generator, dtype=dtype)
    grad_hidden = torch.randn(50, 6, generator=generator, dtype=dtype)
    results = []
    for use_operators in (True, False):
        if not use_operators:
            monkeypatch.setattr(activations, "_use_cpu_operators", lambda projected: False)
        leaf = projected.clone().requires_grad_()
        hidden = activations.swiglu(leaf)
        hidden.backward(grad_hidden)
        results.append((hidden.detach(), leaf.grad))
    atol, rtol = TOLERANCES[dtype]
    assert_close(results[0][0], results[1][0], "hidden", atol, rtol)
    assert_close(results[0][1], results[1][1], "grad of projected", atol, rtol)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: ops.swiglu(torch.randn(3, 5)), r"projected has shape \[3, 5\]; expected \[R, 2F\]"),
        (lambda: ops.swiglu(torch.randn(3)), r"expected \[R, 2F\]"),
        (lambda: ops.swiglu(torch.ones(3, 4, dtype=torch.long)), r"expected a floating-point tensor"),
        (lambda: ops.swiglu_backward(torch.randn(3, 3), torch.randn(3, 4)), r"grad_hidden has shape \[3, 3\]"),
        (lambda: ops.swiglu_backward(torch.randn(3, 2).double(), torch.randn(3, 4)), r"grad_hidden is Double"),
    ],
)
def test_bad_arguments_rejected(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_setting_turns_operators_off():
    projected = torch.randn(4, 6)
    settings.set_cpu_operators(False)
    try:
        assert not activations._use_cpu_operators(projected)
        assert not grouped._use_cpu_operators(projected, 1000)
    finally:
        settings.set_cpu_operators(True)
    assert activations._use_cpu_operators(projected)
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        settings.set_cpu_operators(0)


def test_operators_are_differentiable():
    generator = torch.Generator().manual_seed(7)
    projected = torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (projected,))
    hidden = ops.swiglu(projected)
    (grad,) = torch.autograd.grad(hidden.sum(), projected, create_graph=True)
    with pytest.raises(RuntimeError, match="swiglu_backward has no derivative"):
        grad.sum().backward()


def test_operators_have_fake_kernels():
    projected = torch.empty(3, 8, device="meta")
    assert ops.swiglu(projected).shape == (3, 4)
    assert ops.swiglu_backward(torch.empty(3, 4, device="meta"), projected).shape == (3, 8)


@pytest.mark.parametrize("value,expected", [("off", "False"), ("No", "False"), ("1", "True"), ("yes", "True")])
def test_environment_flag_values(value, expected):
    code = "from inhibmoe_fast import settings; print(settings.cpu_operators_enabled())"
    env = {**os.environ, "INHIBMOE_FAST_CPU_OPERATORS": value}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected


def test_environment_flag_rejects_other_values():
    env = {**os.environ, "INHIBMOE_FAST_CPU_OPERATORS": "maybe"}
    result = subprocess.run([sys.executable, "-c", "import inhibmoe_fast"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "INHIBMOE_FAST_CPU_OPERATORS='maybe' is invalid" in result.stderr
