"""Inputs that have broken MoE kernels, on every backend that runs here: ties, non-finite values, extreme routing."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CPU_BACKENDS
from inhibmoe_fast import InhibitedMoE
from inhibmoe_fast.dispatch import plan_dispatch

BACKENDS = CPU_BACKENDS

# The Triton interpreter computes with NumPy, which warns on the non-finite values these cases pass on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def fixed_router_layer(bias, dim=8, hidden=4, k=2, backend="torch", dtype=torch.float32, **options):
    """A layer whose logits are ``bias`` for every token: zero router weights."""
    torch.manual_seed(0)
    layer = InhibitedMoE(dim, hidden, len(bias), k, backend=backend, dtype=dtype, inhibition="none", **options)
    with torch.no_grad():
        layer.router_weight.zero_()
        layer.router_bias.copy_(torch.tensor(bias, dtype=dtype))
    return layer


def expert_output(layer, e, x):
    """Expert ``e`` of ``layer`` applied to rows ``x``, computed directly."""
    gate, up = (x @ layer.expert_up[e].t()).chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    return hidden @ layer.expert_down[e].t()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_all_equal_picks_lowest(backend):
    layer = fixed_router_layer([0.5] * 8, k=3, backend=backend)
    layer(torch.randn(5, 8))
    assert layer.aux.ids.tolist() == [[0, 1, 2]] * 5
    assert torch.allclose(layer.aux.weights, torch.full((5, 3), 1 / 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_at_kth_place(backend):
    layer = fixed_router_layer([2.0, 1.0, 1.0, 0.0], k=2, backend=backend)
    layer(torch.randn(4, 8))
    assert layer.aux.ids.tolist() == [[0, 1]] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_repeat_bit_for_bit(backend):
    layer = fixed_router_layer([1.0, 3.0, 3.0, 3.0, 1.0, 3.0], k=3, backend=backend)
    x = torch.randn(9, 8)
    y1 = layer(x)
    ids1, weights1 = layer.aux.ids, layer.aux.weights
    y2 = layer(x)
    assert torch.equal(ids1, layer.aux.ids)
    assert torch.equal(weights1, layer.aux.weights)
    assert torch.equal(y1, y2)
    assert ids1[0].tolist() == [1, 2, 3]


def _non_finite_layer(backend, tokens):
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 4, 8, 2, backend=backend, inhibition="none")
    with torch.no_grad():
        layer.router_weight.abs_()  # positive weights: an all -inf row gives all -inf logits
    x = torch.randn(tokens, 8)
    return layer, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend):
    layer, x = _non_finite_layer(backend, 3)
    x[0] = float("nan")
    x[1] = float("-inf")
    clean_layer, _ = _non_finite_layer(backend, 1)
    y = layer(x.requires_grad_())
    ids = layer.aux.ids
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(row)) == 2 for row in ids.tolist()), f"repeated ids: {ids.tolist()}"
    assert int(layer.aux.counts.sum()) == 3 * 2
    assert torch.isnan(layer.aux.weights[0]).all(), "a NaN row must keep NaN weights"
    assert torch.isnan(y[0]).all(), "a NaN row must give a NaN output"
    expected = clean_layer(x[2:].detach())
    assert torch.allclose(y[2], expected[0], rtol=1e-6, atol=1e-7), "a normal row changed next to non-finite rows"
    y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_first_row_of_large_batch(backend):
    layer, x = _non_finite_layer(backend, 1024)
    clean = layer(x).detach()
    x[0] = float("nan")
    y = layer(x)
    ids = layer.aux.ids
    assert ((ids >= 0) & (ids < 8)).all()
    assert (ids[:, 0] != ids[:, 1]).all()
    assert int(layer.aux.counts.sum()) == 2048
    assert torch.allclose(y[1:], clean[1:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equals_num_experts(backend):
    logits = [0.1, 0.4, 0.3, 0.2]
    layer = fixed_router_layer(logits, k=4, backend=backend)
    x = torch.randn(3, 8)
    y = layer(x)
    softmax = torch.softmax(torch.tensor(logits), 0)
    assert layer.aux.ids.tolist() == [[1, 2, 3, 0]] * 3
    assert torch.allclose(layer.aux.weights, softmax[[1, 2, 3, 0]].expand(3, 4))
    dense = sum(softmax[e] * expert_output(layer, e, x) for e in range(4))
    assert torch.allclose(y, dense, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_one_renormalized_weight_is_one(backend):
    layer = fixed_router_layer([0.1, 0.4, 0.3, 0.2], k=1, backend=backend)
    layer(torch.randn(3, 8))
    assert torch.equal(layer.aux.weights, torch.ones(3, 1))


def test_k_beyond_num_experts_rejected():
    with pytest.raises(ValueError, match=r"top_k=5 .*num_experts=4"):
        InhibitedMoE(8, 4, 4, 5)


@pytest.mark.parametrize("experts", [1, 2, 3, 8, 60, 64, 128, 256])
@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_shape_sweep(experts, tokens):
    torch.manual_seed(experts * 1000 + tokens)
    for k in sorted({1, min(2, experts), min(8, experts)}):
        reference = InhibitedMoE(24, 8, experts, k, backend="reference", dtype=torch.float64)
        fast = InhibitedMoE(24, 8, experts, k, backend="torch", dtype=torch.float64)
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(tokens, 24, dtype=torch.float64)
        y_ref, y_fast = reference(x), fast(x)
        assert torch.equal(fast.aux.ids, reference.aux.ids), f"E={experts} k={k} N={tokens}"
        assert torch.allclose(fast.aux.weights, reference.aux.weights, atol=1e-12)
        assert torch.allclose(y_fast, y_ref, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_near_tie_resolved_in_float32(backend):
    torch.manual_seed(0)
    layer = InhibitedMoE(2, 4, 2, 1, backend=backend, inhibition="none", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.router_weight.copy_(torch.tensor([[4.0, 0.0], [4.0, 1.0]]))
        layer.router_bias.zero_()
    x = torch.tensor([[1.0, 0.004]], dtype=torch.bfloat16)
    layer(x)
    logits = layer.aux.logits
    assert logits.dtype == torch.float32
    assert 0 < (logits[0, 1] - logits[0, 0]).item() < 0.01
    assert layer.aux.ids.tolist() == [[1]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_gate_stays_finite(backend, dtype):
    torch.manual_seed(0)
    layer = InhibitedMoE(5, 4, 3, 2, backend=backend, inhibition="local", dtype=dtype)
    with torch.no_grad():
        layer.inhibit_weight.zero_()
        layer.inhibit_bias.copy_(torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0]))
    x = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("tokens", [1, 4, 63, 64, 65, 257])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_to_one_expert(backend, tokens):
    layer = fixed_router_layer([10.0] + [0.0] * 7, k=1, backend=backend)
    x = torch.randn(tokens, 8)
    y = layer(x)
    assert layer.aux.counts.tolist() == [tokens] + [0] * 7
    assert torch.allclose(y, expert_output(layer, 0, x), atol=1e-6)


def test_all_to_one_expert_dispatch_order():
    ids = torch.zeros(65, 1, dtype=torch.long)
    for ratio in (0.0, float("inf")):
        plan = plan_dispatch(ids, 8, None, ratio)
        assert plan.counts.tolist() == [65] + [0] * 7
        assert plan.pair_of_row[: 65].tolist() == list(range(65)), "dispatch must be stable in token order"


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_expert(backend):
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 4, 1, 1, backend=backend, inhibition="local")
    x = torch.randn(10, 8)
    y = layer(x)
    assert layer.aux.counts.tolist() == [10]
    assert torch.allclose(y, expert_output(layer, 0, x), atol=1e-6)


def test_large_index_offsets_are_64_bit():
    tokens, k, experts = 262_145, 2, 4
    ids = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], dim=1)
    plan = plan_dispatch(ids, experts, None, float("inf"))
    assert plan.row_of_pair.dtype == torch.int64
    assert plan.pair_of_row.dtype == torch.int64
    dim = 4096
    # Element offsets of the last row reach past 2**31 and must stay exact.
    assert int(plan.row_of_pair.max()) * dim > 2**31
    assert sorted(plan.row_of_pair.tolist()) == sorted(set(plan.row_of_pair.tolist()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_drops_contribute_zero(backend):
    layer = fixed_router_layer([10.0, 0.0], k=1, backend=backend, capacity_factor=1.3)
    assert math.ceil(1.3 * 6 * 1 / 2) == 4
    x = torch.randn(6, 8, requires_grad=True)
    y = layer(x)
    assert layer.aux.kept.squeeze(1).tolist() == [True] * 4 + [False] * 2
    assert torch.equal(y[4:], torch.zeros(2, 8))
    assert torch.allclose(y[:4], expert_output(layer, 0, x[:4]), atol=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad[4:], torch.zeros(2, 8)), "dropped tokens get no gradient through the experts"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inhibition", ["none", "local"])
def test_empty_batch(backend, inhibition):
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 4, 4, 2, backend=backend, inhibition=inhibition, load_balance_coef=0.1, z_loss_coef=0.1)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    assert layer.aux.counts.tolist() == [0, 0, 0, 0]
    (y.sum() + layer.aux.loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_in_slot_order(backend):
    """Expert outputs 1e8, -1e8 and 1 with equal weights: only slot order gives exactly 1/3."""
    layer = fixed_router_layer([1.0, 1.0, 1.0, -5.0], k=3, backend=backend, activation="relu", expert_bias=True)
    with torch.no_grad():
        layer.expert_up.zero_()
        layer.expert_down_bias[:3] = torch.tensor([1e8, -1e8, 1.0]).unsqueeze(1)
    y = layer(torch.randn(2, 8))
    weights = layer.aux.weights[0]
    expected = weights[0] * 1e8 + weights[1] * -1e8 + weights[2] * 1.0
    assert torch.equal(y, torch.full_like(y, expected.item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_runs_bit_identical(backend):
    torch.manual_seed(0)
    layer = InhibitedMoE(32, 16, 16, 8, backend=backend, inhibition="local")
    x = torch.randn(200, 32)
    results = []
    for _ in range(2):
        xx = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer(xx)
        y.square().sum().backward()
        results.append([y, xx.grad] + [p.grad for p in layer.parameters()])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_renormalized_weights_survive_underflow(backend):
    """Every sigmoid below about -88.7 rounds to 0: ids fall back to the tie rule, weights stay finite."""
    layer = fixed_router_layer([-90.0, -95.0, -100.0, -89.0, -120.0, -91.0], k=2, backend=backend, score="sigmoid")
    layer.router_bias.requires_grad_(True)
    y = layer(torch.randn(3, 8))
    assert layer.aux.ids.tolist() == [[0, 1]] * 3
    expected = torch.softmax(torch.tensor([-90.0, -95.0]), 0)  # sigmoid(z) / sum ~ softmax(z) this far out
    assert torch.allclose(layer.aux.weights, expected.expand(3, 2), atol=1e-6)
    assert torch.isfinite(layer.aux.load_balance_loss)
    (y.sum() + layer.aux.z_loss + layer.aux.load_balance_loss).backward()
    assert torch.isfinite(layer.router_bias.grad).all()
