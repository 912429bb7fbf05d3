"""The fast CPU layer against the reference: outputs, routing and every gradient."""

from __future__ import annotations

import pytest
import torch

from conftest import TOLERANCES, assert_close, make_layers, run_layer

CONFIGS = {
    "none": dict(inhibition="none"),
    "local": dict(inhibition="local"),
    "local-low-rank": dict(inhibition="local", gate_rank=3),
    "global": dict(inhibition="global", context_dims=(5, 9)),
    "global-low-rank": dict(inhibition="global", gate_rank=4, context_dims=(7,)),
    "sigmoid": dict(inhibition="local", score="sigmoid"),
    "sigmoid-raw": dict(inhibition="local", score="sigmoid", renormalize=False),
    "softmax-raw": dict(inhibition="none", renormalize=False),
    "capacity": dict(inhibition="local", capacity_factor=0.6),
    "capacity-loose": dict(inhibition="none", capacity_factor=4.0),
    "gelu-bias": dict(inhibition="local", activation="gelu", expert_bias=True),
    "relu-bias": dict(inhibition="none", activation="relu", expert_bias=True, router_bias=False),
    "swiglu-bias": dict(inhibition="local", expert_bias=True),
    "inhibit-experts": dict(inhibition="local", inhibit_experts=True),
    "aux-losses": dict(inhibition="local", load_balance_coef=0.3, z_loss_coef=0.05),
    "dropout": dict(inhibition="dropout", dropout_p=0.5),
}


def _inputs(dtype, tokens=(3, 7), dim=16, context_dims=(), seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, dim, generator=generator, dtype=dtype)
    context = [torch.randn(4 + 9 * i, width, generator=generator, dtype=dtype) for i, width in enumerate(context_dims)]
    return x, (context or None)


def _compare(reference, fast, x, context, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.manual_seed(5)  # the same dropout mask in both runs
    y_ref, grads_ref = run_layer(reference, x, context)
    torch.manual_seed(5)
    y_fast, grads_fast = run_layer(fast, x, context)
    assert torch.equal(fast.aux.ids, reference.aux.ids), "expert ids differ"
    assert torch.equal(fast.aux.counts, reference.aux.counts), "expert counts differ"
    assert torch.equal(fast.aux.kept, reference.aux.kept), "kept masks differ"
    assert_close(y_fast, y_ref, "output", atol, rtol)
    assert_close(fast.aux.logits, reference.aux.logits, "logits", atol, rtol)
    assert_close(fast.aux.weights, reference.aux.weights, "weights", atol, rtol)
    assert_close(fast.aux.loss, reference.aux.loss, "aux loss", atol, rtol)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        if grads_ref[name] is None:  # a parameter the call did not use, such as an absent source's projection
            assert grads_fast[name] is None, f"grad of {name}: expected None"
            continue
        assert_close(grads_fast[name], grads_ref[name], f"grad of {name}", atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_reference(name, dtype, layout):
    options = CONFIGS[name]
    reference, fast = make_layers(dtype=dtype, **options)
    x, context = _inputs(dtype, context_dims=options.get("context_dims", ()))
    _compare(reference, fast, x, context, dtype)


@pytest.mark.parametrize("dim,hidden", [(16, 12), (13, 7)])
@pytest.mark.parametrize("experts,k", [(1, 1), (3, 3), (8, 1), (8, 5)])
def test_shapes_match_reference(dim, hidden, experts, k, layout):
    reference, fast = make_layers(dim=dim, hidden=hidden, experts=experts, k=k, dtype=torch.float32, inhibition="local")
    x, _ = _inputs(torch.float32, tokens=(11,), dim=dim)
    _compare(reference, fast, x, None, torch.float32)


def test_global_with_missing_source(layout):
    reference, fast = make_layers(inhibition="global", context_dims=(5, 9))
    x, context = _inputs(torch.float64, context_dims=(5, 9))
    _compare(reference, fast, x, [context[0], None], torch.float64)


def test_eval_mode_dropout_is_identity():
    reference, fast = make_layers(inhibition="dropout", dropout_p=0.5)
    plain_reference, plain_fast = make_layers(inhibition="none")
    for layer in (reference, fast, plain_reference, plain_fast):
        layer.eval()
    x, _ = _inputs(torch.float64)
    assert torch.equal(fast(x), plain_fast(x))
    assert torch.equal(reference(x), plain_reference(x))


def test_bfloat16_close_to_float64_reference():
    reference, fast = make_layers(dtype=torch.float64, inhibition="local")
    x, _ = _inputs(torch.float64)
    expected = reference(x)
    reference_bf16 = reference.to(torch.bfloat16)
    fast_bf16 = fast.to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    error_reference = (reference_bf16(x_bf16).double() - expected).abs().max()
    error_fast = (fast_bf16(x_bf16).double() - expected).abs().max()
    assert torch.equal(fast_bf16.aux.ids, reference_bf16.aux.ids)
    assert error_fast <= 2 * error_reference + 1e-3, f"bf16 error {error_fast} vs reference bf16 error {error_reference}"


@pytest.mark.parametrize("name", ["local", "global", "local-low-rank", "capacity", "gelu-bias"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_tiny_layer(name, backend):
    options = CONFIGS[name]
    _, layer = make_layers(dim=8, hidden=6, experts=3, k=2, backend=backend, **options)
    x, context = _inputs(torch.float64, tokens=(5,), dim=8, context_dims=options.get("context_dims", ()))
    params = [p for p in layer.parameters()]
    inputs = [x.requires_grad_()] + ([c.requires_grad_() for c in context] if context else [])

    def function(*tensors):
        x_, *context_ = tensors[: len(inputs)]
        return layer(x_, context_ or None)

    assert torch.autograd.gradcheck(function, tuple(inputs), eps=1e-6, atol=1e-6)
    # Parameters: perturb each in turn through a functional call.
    names = [n for n, _ in layer.named_parameters()]

    def of_params(*values):
        state = dict(zip(names, values))
        return torch.func.functional_call(layer, state, (x.detach(), None if context is None else [c.detach() for c in context]))

    assert torch.autograd.gradcheck(of_params, tuple(p.detach().requires_grad_() for p in params), eps=1e-6, atol=1e-6)


def _second_order(layer, x, context):
    """Gradients of the squared norm of every first-order gradient, with respect to the input and parameters."""
    inputs = [x, *layer.parameters()]
    y = layer(x, context)
    grads = torch.autograd.grad(y.square().sum() + layer.aux.loss, inputs, create_graph=True, allow_unused=True)
    total = sum(g.square().sum() for g in grads if g is not None)
    return torch.autograd.grad(total, inputs, allow_unused=True)


@pytest.mark.parametrize("name", ["local", "swiglu-bias", "gelu-bias", "relu-bias", "capacity", "global-low-rank"])
def test_double_backward_matches_reference(name, layout):
    """create_graph=True runs the fast path's differentiable backward; its gradients match the reference's."""
    options = CONFIGS[name]
    reference, fast = make_layers(dim=8, hidden=6, experts=3, k=2, **options)
    x, context = _inputs(torch.float64, tokens=(7,), dim=8, context_dims=options.get("context_dims", ()))
    x.requires_grad_()
    expected = _second_order(reference, x, context)
    got = _second_order(fast, x, context)
    atol, rtol = TOLERANCES[torch.float64]
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None, f"second-order gradient {i}: expected None"
            continue
        assert_close(g, e, f"second-order gradient {i}", atol, rtol)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradgradcheck_tiny_layer(backend, layout):
    _, layer = make_layers(dim=6, hidden=4, experts=3, k=2, backend=backend, inhibition="local", expert_bias=True)
    x, _ = _inputs(torch.float64, tokens=(5,), dim=6)
    assert torch.autograd.gradgradcheck(lambda x_: layer(x_), (x.requires_grad_(),), eps=1e-6, atol=1e-6)
