"""The Mixtral-style baseline computes the same function as the layer without inhibition."""

from __future__ import annotations

import pytest
import torch

from inhibmoe_fast import InhibitedMoE
from inhibmoe_fast.baselines import MixtralStyleMoE


@pytest.mark.parametrize("tokens, dim, hidden, experts, k, router_bias", [
    (37, 24, 20, 6, 2, True),
    (50, 17, 9, 5, 1, False),
    (64, 32, 16, 8, 3, True),
])
def test_mixtral_style_matches_reference(tokens, dim, hidden, experts, k, router_bias):
    torch.manual_seed(0)
    reference = InhibitedMoE(dim, hidden, experts, k, inhibition="none", backend="reference", router_bias=router_bias,
                             dtype=torch.float64)
    if router_bias:
        with torch.no_grad():
            reference.router_bias.normal_()  # a zero bias would hide a missed copy
    block = MixtralStyleMoE.from_layer(reference)
    x = torch.randn(2, tokens, dim, dtype=torch.float64)
    grad = torch.randn_like(x)

    x_reference = x.clone().requires_grad_()
    expected = reference(x_reference)
    expected.backward(grad)
    x_block = x.clone().requires_grad_()
    actual = block(x_block)
    actual.backward(grad)

    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x_block.grad, x_reference.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(block.gate.weight.grad, reference.router_weight.grad, atol=1e-12, rtol=1e-12)


def test_mixtral_style_copies_weights():
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2, inhibition="none", router_bias=False)
    block = MixtralStyleMoE.from_layer(layer)
    assert block.gate.bias is None
    assert torch.equal(block.experts[3].w1.weight, layer.expert_up[3, :6])
    assert torch.equal(block.experts[3].w3.weight, layer.expert_up[3, 6:])
    assert torch.equal(block.experts[3].w2.weight, layer.expert_down[3])
    assert block.experts[3].w2.weight.data_ptr() != layer.expert_down.data_ptr()


def test_mixtral_style_rejects_gelu_layer():
    layer = InhibitedMoE(8, 6, 4, 2, inhibition="none", activation="gelu")
    with pytest.raises(ValueError, match="activation='gelu'"):
        MixtralStyleMoE.from_layer(layer)
