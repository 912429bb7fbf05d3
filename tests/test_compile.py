"""torch.compile(fullgraph=True) of a model with InhibitedMoE against eager, and opcheck of the custom operators.

The compiled runs use the ``aot_eager`` backend, which traces the fake kernels
and autograd formulas as inductor does, without inductor's C++ compile time.
One small case runs with the default inductor backend.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TOLERANCES, assert_close
from inhibmoe_fast import InhibitedMoE
from inhibmoe_fast.dispatch import gather_tokens, plan_dispatch, plan_fixed_dispatch, scatter_pairs
from inhibmoe_fast.grouped import grouped_linear_op, grouped_linear_weight_grad_op

AUX_LOSSES = dict(load_balance_coef=0.1, z_loss_coef=0.01)

# hidden_dim=8 lets float32 experts run F.grouped_mm (rows 16-byte aligned); hidden_dim=6
# and float64 run the loop over groups.
CASES = {
    "none": dict(inhibition="none"),
    "local-swiglu": dict(inhibition="local"),
    "local-low-rank-gelu-bias": dict(inhibition="local", gate_rank=3, activation="gelu", expert_bias=True),
    "global-relu": dict(inhibition="global", context_dims=(5, 3), activation="relu"),
    "capacity-bias": dict(inhibition="local", capacity_factor=0.6, expert_bias=True),
    "capacity-loose": dict(inhibition="none", capacity_factor=4.0),
    "odd-hidden": dict(inhibition="local", hidden_dim=6, expert_bias=True),
    "float64": dict(inhibition="global", context_dims=(5,), gate_rank=2, dtype=torch.float64),
}
DYNAMIC_CASES = ["local-swiglu", "global-relu", "capacity-bias"]


class TinyModel(nn.Module):
    """A linear embedding followed by an InhibitedMoE with a residual connection."""

    def __init__(self, dim, backend, dtype, hidden_dim=8, **options):
        super().__init__()
        self.embed = nn.Linear(dim, dim, dtype=dtype)
        self.moe = InhibitedMoE(dim, hidden_dim, 4, 2, backend=backend, dtype=dtype, **AUX_LOSSES, **options)

    def forward(self, x, context=None):
        h = self.embed(x)
        return h + self.moe(h, context), self.moe.aux.loss


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Start each test with empty compile caches, so earlier tests' graphs do not count toward recompile limits."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _make_model(backend, options):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    torch.manual_seed(0)
    return TinyModel(8, backend, dtype, **options), dtype


def _inputs(model, dtype, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, 8, generator=generator, dtype=dtype)
    widths = model.moe.config.context_dims
    context = [torch.randn(3 + 4 * i, width, generator=generator, dtype=dtype) for i, width in enumerate(widths)]
    grad_output = torch.randn(batch, 5, 8, generator=generator, dtype=dtype)
    return x, (context or None), grad_output


def _run(model, call, x, context, grad_output):
    """Run forward and backward; return the output, the aux loss, the layer's aux and every gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if context is not None:
        context = [c.detach().clone().requires_grad_() for c in context]
    y, aux_loss = call(x, context)
    (torch.sum(y * grad_output) + aux_loss).backward()
    grads = {"x": x.grad}
    for i, source in enumerate(context or []):
        grads[f"context[{i}]"] = source.grad
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return y.detach(), aux_loss.detach(), model.moe.aux, grads


def _check_compiled(model, compiled, dtype, batch, seed):
    atol, rtol = TOLERANCES[dtype]
    x, context, grad_output = _inputs(model, dtype, batch, seed)
    y_eager, loss_eager, aux_eager, grads_eager = _run(model, model, x, context, grad_output)
    y_compiled, loss_compiled, aux_compiled, grads_compiled = _run(model, compiled, x, context, grad_output)

    assert torch.equal(aux_compiled.ids, aux_eager.ids), "expert ids differ"
    assert torch.equal(aux_compiled.counts, aux_eager.counts), "expert counts differ"
    assert torch.equal(aux_compiled.kept, aux_eager.kept), "kept masks differ"
    assert_close(y_compiled, y_eager, "output", atol, rtol)
    assert_close(loss_compiled, loss_eager, "aux loss", atol, rtol)
    assert_close(aux_compiled.weights, aux_eager.weights, "weights", atol, rtol)
    assert grads_compiled.keys() == grads_eager.keys()
    for name, expected in grads_eager.items():
        assert_close(grads_compiled[name], expected, f"grad of {name}", atol, rtol)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_matches_eager(name, backend):
    model, dtype = _make_model(backend, CASES[name])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _check_compiled(model, compiled, dtype, batch=2, seed=1)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", DYNAMIC_CASES)
def test_dynamic_fullgraph_matches_eager(name, backend):
    model, dtype = _make_model(backend, CASES[name])
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    _check_compiled(model, compiled, dtype, batch=2, seed=1)
    # A second token count must reuse the graph, except where the reference pools the
    # context with adaptive_max_pool1d: torch.compile specializes its output size.
    pools_context = backend == "reference" and CASES[name]["inhibition"] == "global"
    with torch._dynamo.config.patch(error_on_recompile=not pools_context):
        _check_compiled(model, compiled, dtype, batch=3, seed=2)


def test_inductor_capacity_case():
    model, dtype = _make_model("torch", CASES["capacity-bias"])
    compiled = torch.compile(model, fullgraph=True)
    _check_compiled(model, compiled, dtype, batch=2, seed=1)


def test_compiled_double_backward_raises():
    """PyTorch's compiled autograd has no double backward; the call must fail with that message."""
    model, _ = _make_model("torch", CASES["local-swiglu"])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 8, requires_grad=True)
    y, _ = compiled(x)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize("capacity", [None, 3, 40])
def test_fixed_plan_matches_plan(capacity):
    generator = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(17)])
    plan = plan_dispatch(ids, 6, capacity, float("inf"))
    fixed = plan_fixed_dispatch(ids, 6, capacity)
    assert fixed.num_rows == ids.numel()
    assert torch.equal(fixed.counts, plan.counts)
    assert torch.equal(fixed.kept_counts, plan.kept_counts)
    assert torch.equal(fixed.kept, plan.kept)
    assert torch.equal(fixed.group_sizes, plan.counts)

    # Rows round-trip: every kept pair gets its own token back, every dropped pair zeros.
    tokens = torch.arange(1, 18, dtype=torch.float64).unsqueeze(1).expand(17, 3)
    rows = gather_tokens(tokens, fixed, 2)
    pairs = scatter_pairs(rows, fixed).view(17, 2, 3)
    expected = torch.where(fixed.kept.unsqueeze(-1), tokens.unsqueeze(1), torch.zeros(()))
    assert torch.equal(pairs, expected)


# Shapes (rows, in, out) of the opcheck cases: 16-byte aligned float32 widths run F.grouped_mm,
# odd widths and float64 run the loop. The offsets leave group 1 empty.
OPCHECK_SHAPES = [(9, 8, 4, torch.float32), (9, 5, 3, torch.float32), (9, 5, 3, torch.float64)]


def _opcheck_args(rows, width_in, width_out, dtype):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(rows, width_in, generator=generator, dtype=dtype)
    weight = torch.randn(3, width_out, width_in, generator=generator, dtype=dtype)
    grad_y = torch.randn(rows, width_out, generator=generator, dtype=dtype)
    offsets = torch.tensor([4, 4, rows], dtype=torch.int32)
    return x, weight, grad_y, offsets


@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=str)
def test_opcheck_grouped_linear(shape):
    x, weight, _, offsets = _opcheck_args(*shape)
    torch.library.opcheck(grouped_linear_op, (x.requires_grad_(), weight.requires_grad_(), offsets))


@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=str)
def test_opcheck_grouped_linear_weight_grad(shape):
    x, _, grad_y, offsets = _opcheck_args(*shape)
    torch.library.opcheck(grouped_linear_weight_grad_op, (grad_y.requires_grad_(), x.requires_grad_(), offsets))


@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=str)
def test_grouped_linear_op_matches_mm(shape):
    x, weight, grad_y, offsets = _opcheck_args(*shape)
    x.requires_grad_()
    weight.requires_grad_()
    y = grouped_linear_op(x, weight, offsets)
    y.backward(grad_y)
    bounds = [(0, 0, 4), (2, 4, shape[0])]
    expected_y = torch.zeros_like(y)
    expected_grad_x = torch.zeros_like(x)
    expected_grad_w = torch.zeros_like(weight)
    for group, start, end in bounds:
        expected_y[start:end] = x[start:end].detach() @ weight[group].detach().t()
        expected_grad_x[start:end] = grad_y[start:end] @ weight[group].detach()
        expected_grad_w[group] = grad_y[start:end].t() @ x[start:end].detach()
    atol, rtol = TOLERANCES[shape[3]]
    assert_close(y.detach(), expected_y, "output", atol, rtol)
    assert_close(x.grad, expected_grad_x, "grad of x", atol, rtol)
    assert_close(weight.grad, expected_grad_w, "grad of weight", atol, rtol)


# Weight strides of gradients that reach the op in a double backward: sums over one or more
# dimensions expand with zero strides, which grouped_mm takes only in some patterns.
@pytest.mark.parametrize("strides", [(8, 1, 0), (12, 0, 1), (8, 0, 1), (0, 12, 1), (0, 0, 1), (1, 0, 0)], ids=str)
def test_grouped_linear_op_takes_any_weight_strides(strides):
    x, weight, _, offsets = _opcheck_args(9, 12, 8, torch.float32)
    strided = torch.randn(128).as_strided(weight.shape, strides)
    expected = grouped_linear_op(x, strided.contiguous(), offsets)
    assert_close(grouped_linear_op(x, strided, offsets), expected, "output", *TOLERANCES[torch.float32])


def test_grouped_linear_op_gradgradcheck():
    x, weight, grad_y, offsets = _opcheck_args(*OPCHECK_SHAPES[2])
    x, weight, grad_y = x.requires_grad_(), weight.requires_grad_(), grad_y.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: grouped_linear_op(x, w, offsets), (x, weight))
    assert torch.autograd.gradgradcheck(lambda gy, x: grouped_linear_weight_grad_op(gy, x, offsets), (grad_y, x))


def test_grouped_linear_op_double_backward_float32_matches_float64():
    """The float32 inputs run F.grouped_mm, the float64 ones the loop; both give the same second derivatives."""
    x64, weight64, _, offsets = _opcheck_args(9, 8, 4, torch.float64)
    results = []
    for dtype in (torch.float32, torch.float64):
        x, weight = x64.to(dtype).requires_grad_(), weight64.to(dtype).requires_grad_()
        y = grouped_linear_op(x, weight, offsets)
        grads = torch.autograd.grad(y.square().sum(), (x, weight), create_graph=True)
        # The sum's gradient is an expanded tensor with zero strides, which grouped_mm rejects as is.
        results.append(torch.autograd.grad(sum(g.sum() for g in grads), (x, weight)))
    atol, rtol = TOLERANCES[torch.float32]
    for name, got, expected in zip(("x", "weight"), *results):
        assert_close(got, expected.float(), f"second-order gradient of {name}", atol, rtol)
