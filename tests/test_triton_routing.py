"""Fused Triton routing kernels against the reference: values, ids, gradients and hard cases.

Without a GPU the kernels run on CPU tensors through the Triton interpreter:
this module sets ``TRITON_INTERPRET=1`` before it imports the kernels. Triton
reads the variable when a kernel is defined, and ``inhibmoe_fast`` imports the
kernels lazily, so earlier test modules that imported torch or inhibmoe_fast
do not get in the way. With a GPU the kernels are compiled and the tests run
on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from inhibmoe_fast import InhibitedMoE, ReferenceMoE  # noqa: E402
from inhibmoe_fast.config import MoEConfig  # noqa: E402
from inhibmoe_fast.kernels import routing as kernels  # noqa: E402
from inhibmoe_fast.reference import scores_from_logits, select_experts  # noqa: E402
from inhibmoe_fast.routing import route  # noqa: E402

from conftest import assert_close  # noqa: E402

# The interpreter computes with numpy, which warns on the NaN and infinite inputs these tests pass on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"
if DEVICE == "cpu" and not kernels.INTERPRETED:
    pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set and no GPU is present",
                allow_module_level=True)

# (atol, rtol) of float32 kernels against a float64 reference.
FLOAT32_TOLERANCE = (2e-5, 1e-4)


def make_inputs(tokens, dim, experts, gate="full", rank=5, context=None, context_width=7, dtype=torch.float32,
                seed=0, scale=1.0):
    """Draw seeded routing inputs in float64 on the CPU; return a dict of tensors for :func:`route`."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, std=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std

    inputs = dict(x=draw(tokens, dim, std=scale), router_weight=draw(experts, dim, std=dim ** -0.5),
                  router_bias=draw(experts, std=0.1))
    if gate == "full":
        inputs.update(gate_weight=draw(dim, dim, std=dim ** -0.5), gate_bias=draw(dim, std=0.1))
    elif gate == "low_rank":
        inputs.update(gate_u=draw(dim, rank, std=rank ** -0.5), gate_v=draw(rank, dim, std=dim ** -0.5),
                      gate_bias=draw(dim, std=0.1))
    if context == "term":
        inputs["context"] = draw(tokens, dim, std=0.5)
    elif context == "projected":
        inputs.update(context=draw(tokens, context_width), context_weight=draw(dim, context_width, std=0.3))
    return {name: value.to(dtype) for name, value in inputs.items()}


def reference_route(x, router_weight, router_bias=None, *, top_k, score="softmax", renormalize=True,
                    gate_weight=None, gate_u=None, gate_v=None, gate_bias=None, context=None, context_weight=None):
    """Route in plain PyTorch with the reference layer's rules; return ``(logits, ids, weights)``.

    The gate runs in the input dtype and the logits in float32 (float64 for
    float64 inputs), as in :mod:`inhibmoe_fast.reference`.
    """
    u = x
    if gate_weight is not None or gate_u is not None:
        weight = gate_weight if gate_weight is not None else gate_u @ gate_v
        pre_activation = x @ weight.t()
        if gate_u is not None:
            pre_activation = (x @ gate_v.t()) @ gate_u.t()
        if gate_bias is not None:
            pre_activation = pre_activation + gate_bias
        if context is not None:
            pre_activation = pre_activation + (context if context_weight is None else context @ context_weight.t())
        u = x * torch.sigmoid(pre_activation)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = u.to(dtype) @ router_weight.to(dtype).t()
    if router_bias is not None:
        logits = logits + router_bias.to(dtype)
    config = MoEConfig(dim=x.shape[1], hidden_dim=1, num_experts=router_weight.shape[0], top_k=top_k, score=score,
                       renormalize=renormalize)
    ids, weights = select_experts(config, scores_from_logits(config, logits), logits)
    return logits, ids, weights


def forward_backward(function, inputs, grad_logits, grad_weights, **options):
    """Run ``function`` on leaf copies of ``inputs`` and backward; return ``(logits, ids, weights, grads)``."""
    leaves = {name: value.detach().clone().requires_grad_() for name, value in inputs.items()}
    outputs = function(**leaves, **options)
    logits, ids, weights = outputs[0], outputs[1], outputs[2]
    loss = (logits.double() * grad_logits.to(logits.device)).sum()
    loss = loss + (weights.double() * grad_weights.to(weights.device)).sum()
    loss.backward()
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    return logits.detach(), ids, weights.detach(), grads


def to_device(inputs, dtype=None):
    return {name: value.to(DEVICE, dtype or value.dtype) for name, value in inputs.items()}


def output_gradients(tokens, experts, top_k, seed=1):
    generator = torch.Generator().manual_seed(seed)
    grad_logits = torch.randn(tokens, experts, generator=generator, dtype=torch.float64)
    grad_weights = torch.randn(tokens, top_k, generator=generator, dtype=torch.float64)
    return grad_logits, grad_weights


def assert_same_ids(actual, expected, label=""):
    actual, expected = actual.cpu(), expected.cpu()
    if torch.equal(actual, expected):
        return
    rows = (actual != expected).any(dim=1).nonzero().squeeze(1)[:5].tolist()
    raise AssertionError(f"{label} ids differ in rows {rows}: {actual[rows].tolist()} vs {expected[rows].tolist()}")


def assert_valid_ids(ids, experts):
    assert ((ids >= 0) & (ids < experts)).all(), f"ids out of range: {ids.tolist()}"
    assert all(len(set(row)) == len(row) for row in ids.tolist()), f"repeated ids: {ids.tolist()}"


GATE_CASES = [
    ("none", None),
    ("full", None),
    ("low_rank", None),
    ("full", "term"),
    ("full", "projected"),
    ("low_rank", "projected"),
]


def test_kernels_run_in_expected_mode():
    assert kernels.INTERPRETED == (DEVICE == "cpu")


@pytest.mark.parametrize("gate,context", GATE_CASES)
@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("sigmoid", False), ("sigmoid", True)])
def test_route_float32_matches_reference(gate, context, score, renormalize):
    tokens, dim, experts, top_k = 37, 96, 6, 2
    inputs = make_inputs(tokens, dim, experts, gate=gate, context=context, dtype=torch.float64)
    grad_logits, grad_weights = output_gradients(tokens, experts, top_k)
    options = dict(top_k=top_k, score=score, renormalize=renormalize)
    expected = forward_backward(reference_route, inputs, grad_logits, grad_weights, **options)
    actual = forward_backward(route, to_device(inputs, torch.float32), grad_logits, grad_weights, **options)

    atol, rtol = FLOAT32_TOLERANCE
    assert_same_ids(actual[1], expected[1])
    assert_close(actual[0].cpu().double(), expected[0], "logits", atol, rtol)
    assert_close(actual[2].cpu().double(), expected[2], "weights", atol, rtol)
    for name, grad in expected[3].items():
        assert_close(actual[3][name].cpu().double(), grad, f"grad {name}", atol, rtol)


def _max_error(actual, expected):
    return (actual.double().cpu() - expected).abs().max().item()


def _clear_margin_rows(logits, top_k, margin):
    """Rows whose k-th and (k+1)-th largest logits differ by more than ``margin``."""
    if top_k == logits.shape[1]:
        return torch.ones(logits.shape[0], dtype=torch.bool)
    values = logits.topk(top_k + 1, dim=1).values
    return (values[:, top_k - 1] - values[:, top_k]) > margin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gate", ["full", "low_rank"])
def test_route_low_precision_within_twice_torch_error(dtype, gate):
    dim, experts, top_k = 80, 8, 2
    inputs = make_inputs(96, dim, experts, gate=gate, context="projected", dtype=torch.float64, seed=3)
    # Drop tokens with a near tie at the k-th place: 16-bit rounding may reorder them.
    logits, _, _ = reference_route(**inputs, top_k=top_k)
    keep = _clear_margin_rows(logits, top_k, margin=0.05)
    inputs["x"], inputs["context"] = inputs["x"][keep], inputs["context"][keep]
    tokens = int(keep.sum())
    assert tokens >= 48
    grad_logits, grad_weights = output_gradients(tokens, experts, top_k)

    exact = forward_backward(reference_route, inputs, grad_logits, grad_weights, top_k=top_k)
    low = {name: value.to(dtype) for name, value in inputs.items()}
    torch_low = forward_backward(reference_route, low, grad_logits, grad_weights, top_k=top_k)
    kernel_low = forward_backward(route, to_device(low), grad_logits, grad_weights, top_k=top_k)

    assert_same_ids(kernel_low[1], exact[1], "kernel vs float64")
    assert_same_ids(torch_low[1], exact[1], "torch vs float64")
    assert kernel_low[0].dtype == torch.float32
    pairs = [("logits", 0), ("weights", 2)]
    for name, index in pairs:
        kernel_error = _max_error(kernel_low[index], exact[index])
        torch_error = _max_error(torch_low[index], exact[index])
        assert kernel_error <= 2 * torch_error + 1e-6, f"{name}: kernel error {kernel_error:.3g}, torch {torch_error:.3g}"
    for name, grad in exact[3].items():
        kernel_error = _max_error(kernel_low[3][name], grad)
        torch_error = _max_error(torch_low[3][name], grad)
        scale = grad.abs().max().item()
        assert kernel_error <= 2 * torch_error + 1e-4 * scale, (
            f"grad {name}: kernel error {kernel_error:.3g}, torch {torch_error:.3g}"
        )


def _fixed_logits(bias, tokens=5, dim=8, top_k=2, score="softmax"):
    """Route with zero router weights, so every token's logits equal ``bias``."""
    experts = len(bias)
    router_weight = torch.zeros(experts, dim, device=DEVICE)
    router_bias = torch.tensor(bias, dtype=torch.float32, device=DEVICE)
    x = torch.randn(tokens, dim, device=DEVICE)
    return route(x, router_weight, router_bias, top_k=top_k, score=score)


def test_tie_all_equal_picks_lowest():
    result = _fixed_logits([0.5] * 8, top_k=3)
    assert result.ids.tolist() == [[0, 1, 2]] * 5
    assert torch.allclose(result.weights.cpu(), torch.full((5, 3), 1 / 3))


def test_tie_at_kth_place():
    result = _fixed_logits([2.0, 1.0, 1.0, 0.0], top_k=2)
    assert result.ids.tolist() == [[0, 1]] * 5


def test_sigmoid_nan_logit_counts_as_largest():
    result = _fixed_logits([0.0, 1.0, float("nan"), float("-inf"), 1.0], top_k=4, score="sigmoid")
    assert result.ids.tolist() == [[2, 1, 4, 0]] * 5
    assert torch.isnan(result.weights).all(), "a NaN score must reach the renormalised weights"


def test_saturated_sigmoid_scores_tie_to_lower_index():
    # sigmoid(40) and sigmoid(60) both round to 1.0 in float32: a tie.
    result = _fixed_logits([0.0, 40.0, 60.0, 1.0], top_k=2, score="sigmoid")
    assert result.ids.tolist() == [[1, 2]] * 5


def _non_finite_inputs(tokens=6, dim=12, experts=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=generator)
    # Positive weights: a row of -inf gives -inf logits, a row of +inf +inf logits.
    router_weight = torch.rand(experts, dim, generator=generator) + 0.1
    x[0] = float("nan")
    x[1] = float("-inf")
    x[2] = float("inf")
    x[3, 4] = float("nan")
    return x, router_weight


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_non_finite_rows(score, top_k):
    tokens, experts = 6, 8
    x, router_weight = _non_finite_inputs(tokens, experts=experts)
    x, router_weight = x.to(DEVICE).requires_grad_(), router_weight.to(DEVICE).requires_grad_()
    result = route(x, router_weight, top_k=top_k, score=score)
    ids = result.ids.cpu()
    assert_valid_ids(ids, experts)
    assert int(result.counts.sum()) == tokens * top_k
    assert result.order.sort().values.tolist() == list(range(tokens * top_k))
    config = MoEConfig(dim=12, hidden_dim=1, num_experts=experts, top_k=top_k, score=score)
    expected_logits = result.logits.detach().cpu()
    expected_ids, _ = select_experts(config, scores_from_logits(config, expected_logits), expected_logits)
    assert_same_ids(ids, expected_ids, "kernel vs reference on the kernel's logits")
    assert torch.isnan(result.weights[0]).all(), "a NaN row must keep NaN weights"
    clean = route(x[4:].detach(), router_weight.detach(), top_k=top_k, score=score)
    assert torch.equal(result.ids[4:], clean.ids)
    assert torch.equal(result.weights[4:].detach(), clean.weights)
    (result.weights.nan_to_num().sum() + result.logits.nan_to_num().sum()).backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad[4:]).all()


@pytest.mark.parametrize("top_k", [1, 4])
def test_k_one_and_k_equals_num_experts(top_k):
    logits = [0.1, 0.4, 0.3, 0.2]
    result = _fixed_logits(logits, tokens=3, top_k=top_k)
    softmax = torch.softmax(torch.tensor(logits), 0)
    expected = [1, 2, 3, 0][:top_k]
    assert result.ids.tolist() == [expected] * 3
    expected_weights = softmax[expected] / softmax[expected].sum()
    assert torch.allclose(result.weights.cpu(), expected_weights.expand(3, top_k), atol=1e-6)


SWEEP_EXPERTS = [1, 2, 3, 8, 60, 64, 128, 256]


@pytest.mark.parametrize("experts", SWEEP_EXPERTS)
@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_shape_sweep(experts, tokens):
    dim = 96 if experts % 2 else 200
    inputs = make_inputs(tokens, dim, experts, gate="full", dtype=torch.float64, seed=experts * 1000 + tokens)
    atol, rtol = FLOAT32_TOLERANCE
    for top_k in sorted({1, min(2, experts), min(8, experts), experts if experts <= 8 else 1}):
        logits, ids, weights = reference_route(**inputs, top_k=top_k)
        result = route(**to_device(inputs, torch.float32), top_k=top_k)
        label = f"E={experts} N={tokens} k={top_k}"
        assert_same_ids(result.ids, ids, label)
        assert_close(result.logits.cpu().double(), logits, f"{label} logits", atol, rtol)
        assert_close(result.weights.cpu().double(), weights, f"{label} weights", atol, rtol)
        assert result.counts.tolist() == torch.bincount(ids.reshape(-1), minlength=experts).tolist()
        expected_order = torch.sort(ids.reshape(-1), stable=True).indices
        assert torch.equal(result.order.cpu(), expected_order), f"{label}: order"


@pytest.mark.parametrize("experts,tokens", [(3, 7), (60, 33), (256, 20)])
def test_shape_sweep_gradients(experts, tokens):
    top_k = min(2, experts)
    inputs = make_inputs(tokens, 200, experts, gate="low_rank", context="term", dtype=torch.float64, seed=experts)
    grad_logits, grad_weights = output_gradients(tokens, experts, top_k)
    expected = forward_backward(reference_route, inputs, grad_logits, grad_weights, top_k=top_k)
    actual = forward_backward(route, to_device(inputs, torch.float32), grad_logits, grad_weights, top_k=top_k)
    assert_same_ids(actual[1], expected[1])
    atol, rtol = FLOAT32_TOLERANCE
    for name, grad in expected[3].items():
        assert_close(actual[3][name].cpu().double(), grad, f"grad {name}", atol, rtol)


def test_bfloat16_near_tie_resolved_in_float32():
    x = torch.tensor([[1.0, 0.004]], dtype=torch.bfloat16, device=DEVICE)
    router_weight = torch.tensor([[4.0, 0.0], [4.0, 1.0]], dtype=torch.bfloat16, device=DEVICE)
    result = route(x, router_weight, top_k=1)
    assert result.logits.dtype == torch.float32
    assert 0 < (result.logits[0, 1] - result.logits[0, 0]).item() < 0.01
    assert result.ids.tolist() == [[1]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_saturated_gate_stays_finite(dtype):
    torch.manual_seed(0)
    layer = InhibitedMoE(5, 4, 3, 2, backend="triton", inhibition="local", dtype=dtype, device=DEVICE)
    with torch.no_grad():
        layer.inhibit_weight.zero_()
        layer.inhibit_bias.copy_(torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0]))
    x = torch.randn(6, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    y = layer(x)
    (y.float().sum() + layer.aux.logits.sum()).backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("gate", ["none", "full", "low_rank"])
def test_empty_batch(gate):
    inputs = to_device(make_inputs(0, 16, 4, gate=gate, context=None if gate == "none" else "projected"))
    leaves = {name: value.requires_grad_() for name, value in inputs.items()}
    result = route(**leaves, top_k=2)
    assert result.logits.shape == (0, 4)
    assert result.ids.shape == (0, 2)
    assert result.counts.tolist() == [0, 0, 0, 0]
    assert result.offsets.tolist() == [0, 0, 0, 0, 0]
    assert result.order.numel() == 0
    (result.logits.sum() + result.weights.sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None, name
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), name


@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 257])
def test_all_tokens_to_one_expert(tokens):
    result = _fixed_logits([10.0] + [0.0] * 7, tokens=tokens, top_k=1)
    assert result.counts.tolist() == [tokens] + [0] * 7
    assert result.offsets.tolist() == [0] + [tokens] * 8
    assert result.order.tolist() == list(range(tokens)), "dispatch must be stable in token order"


def test_dispatch_order_stable_across_tiles():
    # Several tiles with k = 3: each expert's pairs must stay in pair order.
    inputs = to_device(make_inputs(200, 24, 5, gate="none", seed=7))
    result = route(**inputs, top_k=3)
    flat = result.ids.reshape(-1).cpu()
    assert torch.equal(result.order.cpu(), torch.sort(flat, stable=True).indices)
    assert result.offsets.tolist() == [0] + torch.cumsum(result.counts.cpu(), 0).tolist()
    assert result.offsets.dtype == torch.int64
    assert result.order.dtype == torch.int64


def test_repeat_runs_bit_identical():
    inputs = to_device(make_inputs(150, 48, 16, gate="low_rank", context="projected", seed=5))
    grad_logits, grad_weights = output_gradients(150, 16, 4)
    first = forward_backward(route, inputs, grad_logits, grad_weights, top_k=4)
    second = forward_backward(route, inputs, grad_logits, grad_weights, top_k=4)
    for index in range(3):
        assert torch.equal(first[index], second[index])
    for name in first[3]:
        assert torch.equal(first[3][name], second[3][name]), name


def test_logit_gradient_only_from_logits():
    # Aux losses reach the router through the logits alone.
    inputs = to_device(make_inputs(20, 32, 6, gate="full", seed=9))
    leaves = {name: value.requires_grad_() for name, value in inputs.items()}
    result = route(**leaves, top_k=2)
    torch.logsumexp(result.logits, dim=1).square().mean().backward()
    reference = {name: value.detach().cpu().double().requires_grad_() for name, value in inputs.items()}
    logits, _, _ = reference_route(**reference, top_k=2)
    torch.logsumexp(logits, dim=1).square().mean().backward()
    for name, leaf in leaves.items():
        assert_close(leaf.grad.cpu().double(), reference[name].grad, f"grad {name}", *FLOAT32_TOLERANCE)


def test_input_checks_name_argument():
    x = torch.randn(4, 8, device=DEVICE)
    weight = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"top_k=4 .*num_experts=3"):
        route(x, weight, top_k=4)
    with pytest.raises(ValueError, match=r"router_weight has shape \(3, 7\)"):
        route(x, weight[:, :7].contiguous(), top_k=1)
    with pytest.raises(TypeError, match=r"gate_bias has dtype torch.float16"):
        route(x, weight, top_k=1, gate_weight=torch.randn(8, 8, device=DEVICE),
              gate_bias=torch.randn(8, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64"):
        route(x.double(), weight.double(), top_k=1)
    with pytest.raises(ValueError, match=r"score='max'"):
        route(x, weight, top_k=1, score="max")
    with pytest.raises(ValueError, match=r"gate_u .* gate_v"):
        route(x, weight, top_k=1, gate_u=torch.randn(8, 2, device=DEVICE))


def test_non_contiguous_inputs_accepted():
    inputs = make_inputs(30, 40, 6, gate="full", seed=11)
    strided = {name: value.t().contiguous().t() if value.dim() == 2 else value for name, value in inputs.items()}
    expected = route(**to_device(inputs), top_k=2)
    actual = route(**to_device(strided), top_k=2)
    assert torch.equal(actual.ids, expected.ids)
    assert torch.equal(actual.logits, expected.logits)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs about 10 GB of GPU memory")
def test_offsets_past_2_31_elements():
    # N * E and the row offsets of x pass 2**31 elements, so int32 offsets would wrap.
    experts, dim, width = 128, 16, 144
    tokens = 2**31 // experts + 64
    storage = torch.zeros(tokens, width, dtype=torch.bfloat16, device=DEVICE)
    storage[-64:, :dim] = torch.randn(64, dim, device=DEVICE, dtype=torch.bfloat16)
    x = storage[:, :dim]
    router_weight = torch.randn(experts, dim, device=DEVICE, dtype=torch.bfloat16)
    result = route(x, router_weight, top_k=2, dispatch=False)
    expected = x[-64:].float() @ router_weight.float().t()
    assert torch.allclose(result.logits[-64:], expected, atol=1e-3, rtol=1e-3)
    assert result.ids[-64:].tolist() == select_experts(
        MoEConfig(dim=dim, hidden_dim=1, num_experts=experts, top_k=2), torch.softmax(result.logits[-64:], 1),
        result.logits[-64:],
    )[0].tolist()
    assert int(result.counts.sum()) == 2 * tokens


LAYER_OPTIONS = [
    dict(inhibition="none"),
    dict(inhibition="local"),
    dict(inhibition="local", gate_rank=3, score="sigmoid", renormalize=False, inhibit_experts=True),
    dict(inhibition="global", context_dims=(5, 9), load_balance_coef=0.1, z_loss_coef=0.01),
    dict(inhibition="global", gate_rank=4, context_dims=(7,), router_bias=False, capacity_factor=0.8),
]


def run_layer(layer, x, context, grad_seed=1):
    """Run forward and backward with a float64-drawn output gradient; return the output and every gradient."""
    x = x.detach().clone().requires_grad_()
    context = None if context is None else [c.detach().clone().requires_grad_() for c in context]
    layer.zero_grad(set_to_none=True)
    y = layer(x, context)
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    (torch.sum(y * grad) + layer.aux.loss).backward()
    grads = {"x": x.grad}
    if context is not None:
        grads.update({f"context[{i}]": c.grad for i, c in enumerate(context)})
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return y.detach(), grads


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_layer_matches_reference(options):
    dim, hidden, experts, top_k = 24, 10, 6, 2
    torch.manual_seed(0)
    reference = ReferenceMoE(dim, hidden, experts, top_k, dtype=torch.float64, **options)
    layers = {"reference": reference}
    for backend in ("torch", "triton"):
        layer = InhibitedMoE(dim, hidden, experts, top_k, backend=backend, dtype=torch.float32, **options)
        layer.load_state_dict(reference.state_dict())
        layers[backend] = layer.to(DEVICE)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, dim, generator=generator, dtype=torch.float64)
    context = None
    if options.get("context_dims"):
        context = [torch.randn(4 + 9 * i, width, generator=generator, dtype=torch.float64)
                   for i, width in enumerate(options["context_dims"])]

    y_ref, grads_ref = run_layer(reference, x, context)
    ids_ref = reference.aux.ids
    for backend in ("torch", "triton"):
        layer = layers[backend]
        device_context = None if context is None else [c.float().to(DEVICE) for c in context]
        y, grads = run_layer(layer, x.float().to(DEVICE), device_context)
        assert_same_ids(layer.aux.ids, ids_ref, backend)
        assert_close(y.cpu().double(), y_ref, f"{backend} output", 1e-5, 1e-4)
        for name, grad in grads_ref.items():
            assert_close(grads[name].cpu().double(), grad, f"{backend} grad {name}", 2e-5, 1e-4)


def test_layer_dropout_routes_dropped_input():
    torch.manual_seed(0)
    layer = InhibitedMoE(16, 8, 4, 2, backend="triton", inhibition="dropout", inhibit_experts=True, device=DEVICE)
    x = torch.randn(9, 16, device=DEVICE)
    torch.manual_seed(3)
    y = layer(x)
    ids = layer.aux.ids
    layer.backend = "torch"
    torch.manual_seed(3)
    y_torch = layer(x)
    assert torch.equal(ids, layer.aux.ids)
    assert torch.allclose(y, y_torch, atol=1e-6)


@pytest.mark.parametrize("case", ["tie", "kth_tie", "non_finite", "one_expert"])
def test_backends_agree_on_ids(case):
    ids = {}
    for backend in ("reference", "torch", "triton"):
        torch.manual_seed(0)
        layer = InhibitedMoE(8, 4, 4, 2, backend=backend, inhibition="none", device=DEVICE)
        with torch.no_grad():
            if case == "tie":
                layer.router_weight.zero_()
                layer.router_bias.fill_(0.5)
            elif case == "kth_tie":
                layer.router_weight.zero_()
                layer.router_bias.copy_(torch.tensor([2.0, 1.0, 1.0, 0.0]))
            elif case == "one_expert":
                layer.router_weight.zero_()
                layer.router_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
            else:
                layer.router_weight.abs_()
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(7, 8, generator=generator).to(DEVICE)
        if case == "non_finite":
            x[0], x[1], x[2] = float("nan"), float("-inf"), float("inf")
        layer(x)
        ids[backend] = layer.aux.ids.cpu()
    assert_same_ids(ids["torch"], ids["reference"], "torch vs reference")
    assert_same_ids(ids["triton"], ids["reference"], "triton vs reference")


def test_layer_auto_backend():
    layer = InhibitedMoE(8, 4, 4, 2)
    assert layer.resolved_backend(torch.device("cpu"), torch.float32) == "torch"
    assert layer.resolved_backend(torch.device("cuda"), torch.float32) == "triton"
    assert layer.resolved_backend(torch.device("cuda"), torch.float64) == "torch"


def test_layer_triton_rejects_float64():
    layer = InhibitedMoE(8, 4, 4, 2, backend="triton", dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(3, 8, dtype=torch.float64, device=DEVICE))


def test_sigmoid_renormalized_underflow_matches_reference():
    """Chosen sigmoids that all round to zero still give finite weights and gradients."""
    logits_row = torch.tensor([-90.0, -95.0, -100.0, -89.0, -120.0, -91.0])
    x = torch.eye(6)[:3].to(DEVICE).requires_grad_()
    router_weight = logits_row.unsqueeze(1).expand(6, 6).contiguous().to(DEVICE).requires_grad_()
    result = route(x, router_weight, top_k=2, score="sigmoid", renormalize=True, dispatch=False)
    logits = (x.detach() @ router_weight.detach().t()).cpu()
    config = MoEConfig(dim=6, hidden_dim=1, num_experts=6, top_k=2, score="sigmoid")
    expected_ids, expected_weights = select_experts(config, scores_from_logits(config, logits), logits)
    assert torch.equal(result.ids.cpu(), expected_ids)
    assert torch.allclose(result.weights.cpu(), expected_weights, atol=1e-6)
    result.weights[:, 0].sum().backward()
    assert torch.isfinite(router_weight.grad).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gate,context", [("none", None), ("full", "projected"), ("low_rank", "term")])
def test_route_operator_passes_opcheck(gate, context):
    inputs = to_device(make_inputs(9, 16, 5, gate=gate, context=context), torch.float32)
    tensors = [inputs.get(name) for name in ("x", "router_weight", "router_bias", "gate_weight", "gate_u", "gate_v",
                                             "gate_bias", "context", "context_weight")]
    for tensor in tensors:
        if tensor is not None:
            tensor.requires_grad_()
    for dispatch in (True, False):
        torch.library.opcheck(torch.ops.inhibmoe_fast.triton_route, (*tensors, 2, True, True, dispatch))
    detached = [None if t is None else t.detach() for t in tensors]
    logits, ids, *_ = torch.ops.inhibmoe_fast.triton_route(*detached, 2, True, True, False)
    grad_logits, grad_weights = (g.float().to(DEVICE) for g in output_gradients(9, 5, 2))
    needs = [t is not None for t in detached]
    for grads in ((grad_logits, grad_weights), (None, grad_weights)):
        torch.library.opcheck(torch.ops.inhibmoe_fast.triton_route_backward,
                              (*grads, *detached, logits, ids, True, True, needs))


def test_route_top_k_type():
    inputs = to_device(make_inputs(4, 16, 5, gate="none"), torch.float32)
    numpy = pytest.importorskip("numpy")
    result = route(inputs["x"], inputs["router_weight"], top_k=numpy.int64(2))
    assert result.ids.shape == (4, 2)
    with pytest.raises(TypeError, match=r"top_k=2.0 is invalid; expected an integer"):
        route(inputs["x"], inputs["router_weight"], top_k=2.0)
