"""Property tests: the fast layers agree with the reference on random shapes and options."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CPU_BACKENDS, assert_close
from inhibmoe_fast import InhibitedMoE, ReferenceMoE
from inhibmoe_fast.outputs import MoEAux

# Where the triton backend runs: a GPU, or the CPU through the Triton interpreter.
if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    TRITON_DEVICE = "cuda"
else:
    TRITON_DEVICE = "cpu" if "triton" in CPU_BACKENDS else None

# Few examples per run (each builds two layers and runs forward and backward), drawn the same way
# on every run so that CI results repeat.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_cases(draw, max_tokens=300):
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
        tokens=draw(st.integers(0, max_tokens)),
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
    check_case(case, dtype, "torch", "cpu")


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs a GPU or TRITON_INTERPRET=1")
# Fewer and shorter batches: through the interpreter every kernel program runs in Python.
@settings(PROPERTY_SETTINGS, max_examples=20)
@given(case=layer_cases(max_tokens=100))
def test_triton_layer_matches_reference(case):
    check_case(case, torch.float32, "triton", TRITON_DEVICE)


def check_case(case, dtype, backend, device):
    """Run the reference and the ``backend`` layer on ``case``; compare routing, output and every gradient."""
    torch.manual_seed(case["seed"])
    options = case["options"]
    reference = ReferenceMoE(case["dim"], case["hidden"], case["experts"], case["k"], dtype=dtype, **options)
    fast = InhibitedMoE(case["dim"], case["hidden"], case["experts"], case["k"], backend=backend, dtype=dtype,
                        device=device, **options)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(case["tokens"], case["dim"], dtype=dtype)
    context = None
    if options["inhibition"] == "global":
        context = [torch.randn(case["context_rows"], options["context_dims"][0], dtype=dtype)]
    grad = torch.randn(case["tokens"], case["dim"], dtype=dtype)

    results = []
    for layer, layer_device in ((reference, "cpu"), (fast, device)):
        inputs = x.to(layer_device).requires_grad_()
        sources = None if context is None else [c.to(layer_device).requires_grad_() for c in context]
        y = layer(inputs, sources)
        (torch.sum(y * grad.to(layer_device)) + layer.aux.loss).backward()
        grads = {"x": inputs.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        if sources is not None:
            grads["context[0]"] = sources[0].grad
        results.append(_to_cpu((y.detach(), layer.aux, grads)))

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


def _to_cpu(result):
    y, aux, grads = result
    aux = MoEAux(**{f.name: getattr(aux, f.name).cpu() for f in dataclasses.fields(aux)})
    return y.cpu(), aux, {name: None if g is None else g.cpu() for name, g in grads.items()}
