"""Property tests: the fast CPU layer agrees with the reference on random shapes and options."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close
from inhibmoe_fast import InhibitedMoE, ReferenceMoE

# Few examples per run (each builds two layers and runs forward and backward), drawn the same way
# on every run so that CI results repeat.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_cases(draw):
    experts = draw(st.integers(1, 64))
    options = dict(
        inhibition=draw(st.sampled_from(["none", "local", "global"])),
        score=draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()),
        activation=draw(st.sampled_from(["swiglu", "gelu", "relu"])),
        expert_bias=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.0, 2.0])),
    )
    if options["inhibition"] != "none" and draw(st.booleans()):
        options["gate_rank"] = draw(st.integers(1, 6))
    if options["inhibition"] == "global":
        options["context_dims"] = (draw(st.integers(1, 9)),)
    return dict(
        tokens=draw(st.integers(0, 300)),
        dim=draw(st.integers(1, 24)),
        hidden=draw(st.integers(1, 12)),
        experts=experts,
        k=draw(st.integers(1, experts)),
        context_rows=draw(st.integers(1, 40)),
        seed=draw(st.integers(0, 2**16)),
        options=options,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@PROPERTY_SETTINGS
@given(case=layer_cases())
def test_fast_layer_matches_reference(case, dtype):
    torch.manual_seed(case["seed"])
    options = case["options"]
    reference = ReferenceMoE(case["dim"], case["hidden"], case["experts"], case["k"], dtype=dtype, **options)
    fast = InhibitedMoE(case["dim"], case["hidden"], case["experts"], case["k"], backend="torch", dtype=dtype,
                        **options)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(case["tokens"], case["dim"], dtype=dtype)
    context = None
    if options["inhibition"] == "global":
        context = [torch.randn(case["context_rows"], options["context_dims"][0], dtype=dtype)]
    grad = torch.randn(case["tokens"], case["dim"], dtype=dtype)

    results = []
    for layer in (reference, fast):
        inputs = x.clone().requires_grad_()
        sources = None if context is None else [c.clone().requires_grad_() for c in context]
        y = layer(inputs, sources)
        (torch.sum(y * grad) + layer.aux.loss).backward()
        grads = {"x": inputs.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        if sources is not None:
            grads["context[0]"] = sources[0].grad
        results.append((y.detach(), layer.aux, grads))

    (y_ref, aux_ref, grads_ref), (y_fast, aux_fast, grads_fast) = results
    atol, rtol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-4, 1e-4)
    # Random float inputs make exact ties (outside of underflowing sigmoid scores) vanishingly rare.
    assert torch.equal(aux_fast.ids, aux_ref.ids)
    assert torch.equal(aux_fast.kept, aux_ref.kept)
    assert_close(aux_fast.weights, aux_ref.weights, "weights", atol, rtol)
    assert_close(y_fast, y_ref, "output", atol, rtol)
    for name, expected in grads_ref.items():
        if expected is None:
            assert grads_fast[name] is None, name
        else:
            assert_close(grads_fast[name], expected, f"grad of {name}", atol, rtol)
