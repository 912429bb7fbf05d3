"""Conversion of transformers' Mixtral and Qwen2-MoE sparse blocks (tiny models built from configs)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from inhibmoe_fast import InhibitedMoE  # noqa: E402
from inhibmoe_fast.convert import SharedExpertMoE, add_inhibition, convert_block, replace_moe_blocks  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)


def tiny_mixtral():
    config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # the router starts at zero in some versions; random weights make routing real
        for module in model.modules():
            if type(module).__name__ == "MixtralTopKRouter":
                module.weight.normal_(0, 0.5)
    return model


def tiny_qwen2_moe(norm_topk_prob):
    config = transformers.Qwen2MoeConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=20, norm_topk_prob=norm_topk_prob,
                                         decoder_sparse_step=1, mlp_only_layers=[], **COMMON)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Qwen2MoeTopKRouter":
                module.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("build", [tiny_mixtral, lambda: tiny_qwen2_moe(False), lambda: tiny_qwen2_moe(True)],
                         ids=["mixtral", "qwen2-moe", "qwen2-moe-normalized"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_converted_model_matches_original(build, backend):
    model = build()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = model(tokens).logits
    replaced = replace_moe_blocks(model, backend=backend)
    assert len(replaced) == 2
    with torch.no_grad():
        actual = model(tokens).logits
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4), (actual - expected).abs().max()


def test_converted_block_keeps_routing():
    model = tiny_mixtral()
    block = model.model.layers[0].mlp
    layer = convert_block(block)
    assert isinstance(layer, InhibitedMoE)
    x = torch.randn(7, 32)
    _, weights, ids = block.gate(x)
    layer(x)
    assert torch.equal(layer.aux.ids, ids)
    assert torch.allclose(layer.aux.weights, weights, atol=1e-6)


def test_qwen_shared_expert_wrapper():
    model = tiny_qwen2_moe(False)
    converted = convert_block(model.model.layers[0].mlp)
    assert isinstance(converted, SharedExpertMoE)
    assert converted.moe.config.renormalize is False
    converted(torch.randn(3, 32))
    assert converted.aux.ids.shape == (3, 2)


def test_inhibition_for_fine_tuning():
    model = tiny_mixtral()
    layer = convert_block(model.model.layers[0].mlp)
    inhibited = add_inhibition(layer, "local", gate_rank=4)
    x = torch.randn(9, 32)
    layer(x)
    inhibited(x)
    assert torch.equal(inhibited.aux.ids, layer.aux.ids), "an almost open gate keeps each token's experts"
    inhibited(x).square().sum().backward()
    assert inhibited.inhibit_u.grad is not None
    assert inhibited.inhibit_bias.grad.abs().sum() > 0


def test_inhibition_for_fine_tuning_keeps_shared_expert():
    model = tiny_qwen2_moe(True)
    replace_moe_blocks(model)
    tokens = torch.randint(0, 97, (2, 7))
    before = model(tokens).logits
    for decoder_layer in model.model.layers:
        decoder_layer.mlp = add_inhibition(decoder_layer.mlp, "local", gate_rank=4)
    block = model.model.layers[0].mlp
    assert isinstance(block, SharedExpertMoE) and block.moe.config.inhibition == "local"
    after = model(tokens).logits
    assert after.shape == before.shape
    assert not torch.equal(after, before), "the gate scales the router input by sigmoid(4)"
    after.sum().backward()
    assert block.moe.inhibit_bias.grad is not None and block.shared_expert_gate.weight.grad is not None


def test_conversion_errors():
    model = tiny_mixtral()
    with pytest.raises(TypeError, match="cannot convert Linear"):
        convert_block(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="option 'score' is set by the block"):
        convert_block(model.model.layers[0].mlp, score="sigmoid")
    with pytest.raises(ValueError, match="inhibition='none' is invalid"):
        add_inhibition(convert_block(model.model.layers[0].mlp), "none")
    with pytest.raises(TypeError, match="add_inhibition takes an InhibitedMoE or a SharedExpertMoE, got Linear"):
        add_inhibition(torch.nn.Linear(3, 3), "local")


@pytest.mark.parametrize("source", [dict(inhibition="dropout"), dict(inhibition="global", context_dims=(5,))])
@pytest.mark.parametrize("target", ["local", "global"])
def test_add_inhibition_replaces_other_inhibitions(source, target):
    """The options of the old inhibition (dropout_p, context sources) carry over only where the new one takes them."""
    layer = InhibitedMoE(8, 6, 4, 2, **source)
    inhibited = add_inhibition(layer, target)
    assert inhibited.config.inhibition == target
    assert inhibited.config.dropout_p is None
    keeps_context = target == "global" and source["inhibition"] == "global"
    assert inhibited.config.context_dims == (source["context_dims"] if keeps_context else ())
    assert torch.equal(inhibited.router_weight, layer.router_weight)
