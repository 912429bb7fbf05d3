"""Bad arguments and inputs are rejected with messages that name the argument and the value."""

from __future__ import annotations

import pytest
import torch

from inhibmoe_fast import InhibitedMoE, ReferenceMoE, ops

LAYERS = [InhibitedMoE, ReferenceMoE]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(
    "args,options,pattern",
    [
        ((8, 4, 4, 0), {}, r"top_k=0 .*num_experts=4"),
        ((8, 4, 4, 5), {}, r"top_k=5 .*num_experts=4"),
        ((8, 4, 0, 1), {}, r"num_experts=0"),
        ((0, 4, 4, 1), {}, r"dim=0"),
        ((8, -1, 4, 1), {}, r"hidden_dim=-1"),
        ((8, 4, 4, 2.0), {}, r"top_k=2.0"),
        ((8, 4, 4, 2), {"inhibition": "lateral"}, r"inhibition='lateral'.*'none', 'dropout', 'local', 'global'"),
        ((8, 4, 4, 2), {"score": "sparsemax"}, r"score='sparsemax'"),
        ((8, 4, 4, 2), {"activation": "tanh"}, r"activation='tanh'"),
        ((8, 4, 4, 2), {"capacity_factor": 0}, r"capacity_factor=0"),
        ((8, 4, 4, 2), {"capacity_factor": -1.5}, r"capacity_factor=-1.5"),
        ((8, 4, 4, 2), {"capacity_factor": float("nan")}, r"capacity_factor=nan"),
        ((8, 4, 4, 2), {"gate_rank": 0}, r"gate_rank=0"),
        ((8, 4, 4, 2), {"inhibition": "none", "gate_rank": 2}, r"gate_rank=2 needs inhibition"),
        ((8, 4, 4, 2), {"inhibition": "local", "context_dims": (3,)}, r"context_dims=\(3,\) needs inhibition='global'"),
        ((8, 4, 4, 2), {"inhibition": "global", "context_dims": (3, 0)}, r"context_dims\[1\]=0"),
        ((8, 4, 4, 2), {"inhibition": "dropout", "dropout_p": 1.0}, r"dropout_p=1.0 is invalid"),
        ((8, 4, 4, 2), {"inhibition": "dropout", "dropout_p": False}, r"dropout_p=False is invalid"),
        ((8, 4, 4, 2), {"inhibition": "local", "dropout_p": 0.5}, r"dropout_p=0.5 needs inhibition='dropout'"),
        ((8, 4, 4, 2), {"capacity_factor": True}, r"capacity_factor=True is invalid"),
        ((8, 4, 4, 2), {"load_balance_coef": -1}, r"load_balance_coef=-1"),
        ((8, 4, 4, 2), {"inhibition": "global", "context_dims": 3}, r"context_dims=3 is invalid; expected a tuple"),
        ((8, 4, 4, 2), {"renormalize": "no"}, r"renormalize='no' is invalid; expected True or False"),
        ((8, 4, 4, 2), {"expert_bias": 1}, r"expert_bias=1 is invalid; expected True or False"),
    ],
)
def test_invalid_options_rejected(cls, args, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(*args, **options)


@pytest.mark.parametrize("cls", LAYERS)
def test_unknown_option_rejected(cls):
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'num_expert'.*valid options are"):
        cls(8, 4, 4, 2, num_expert=3)


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match=r"backend='cuda'.*'auto', 'torch', 'reference'"):
        InhibitedMoE(8, 4, 4, 2, backend="cuda")


@pytest.mark.parametrize("cls", LAYERS)
def test_wrong_last_dimension(cls):
    layer = cls(8, 4, 4, 2)
    with pytest.raises(ValueError, match=r"x has shape \(3, 7\); expected \[\.\.\., 8\]"):
        layer(torch.randn(3, 7))


@pytest.mark.parametrize("cls", LAYERS)
def test_scalar_input_rejected(cls):
    layer = cls(8, 4, 4, 2)
    with pytest.raises(ValueError, match=r"x has shape \(\)"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("cls", LAYERS)
def test_integer_input_rejected(cls):
    layer = cls(8, 4, 4, 2)
    with pytest.raises(TypeError, match=r"x has dtype torch.int64; expected a floating dtype"):
        layer(torch.ones(3, 8, dtype=torch.long))


@pytest.mark.parametrize("cls", LAYERS)
def test_dtype_mismatch_rejected(cls):
    layer = cls(8, 4, 4, 2)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the layer parameters are torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("cls", LAYERS)
def test_parameter_dtype_mismatch_names_the_parameter(cls):
    layer = cls(8, 4, 4, 2)
    layer.expert_up.data = layer.expert_up.data.double()
    with pytest.raises(TypeError, match=r"parameter expert_up has dtype torch.float64 but router_weight has torch.float32"):
        layer(torch.randn(3, 8))


@pytest.mark.parametrize("cls", LAYERS)
def test_parameter_device_mismatch_names_the_parameter(cls):
    layer = cls(8, 4, 4, 2)
    layer.expert_down = torch.nn.Parameter(torch.empty(layer.expert_down.shape, device="meta"))
    with pytest.raises(ValueError, match=r"parameter expert_down is on meta but router_weight is on cpu"):
        layer(torch.randn(3, 8))


@pytest.mark.parametrize("cls", LAYERS)
def test_device_mismatch_rejected(cls):
    layer = cls(8, 4, 4, 2, device="meta")
    with pytest.raises(ValueError, match=r"x is on cpu but the layer parameters are on meta"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"x is on meta but the layer parameters are on cpu"):
        cls(8, 4, 4, 2)(torch.randn(3, 8, device="meta"))


@pytest.mark.parametrize("cls", LAYERS)
def test_context_errors(cls):
    layer = cls(8, 4, 4, 2, inhibition="global", context_dims=(5,))
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"context\[0\] has shape \(2, 6\); expected \[\.\.\., 5\]"):
        layer(x, [torch.randn(2, 6)])
    with pytest.raises(ValueError, match=r"context has 2 source\(s\); expected 1"):
        layer(x, [torch.randn(2, 5), torch.randn(2, 5)])
    with pytest.raises(TypeError, match=r"context\[0\] has dtype torch.int64"):
        layer(x, [torch.ones(2, 5, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"context\[0\] has shape \(0, 5\) with no rows"):
        layer(x, [torch.randn(0, 5)])
    with pytest.raises(TypeError, match=r"context must be a tensor, a list or tuple .* got int"):
        layer(x, 5)
    local = cls(8, 4, 4, 2, inhibition="local")
    with pytest.raises(ValueError, match=r"context was given but inhibition='local'"):
        local(x, [torch.randn(2, 5)])


@pytest.mark.parametrize("cls", LAYERS)
def test_rejected_call_changes_nothing(cls):
    layer = cls(8, 4, 4, 2)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    layer(torch.randn(3, 8))
    aux = layer.aux
    with pytest.raises(ValueError):
        layer(torch.randn(3, 9))
    assert layer.aux is aux, "a rejected call must keep the previous aux outputs"
    for name, p in layer.named_parameters():
        assert torch.equal(p, before[name]), name


def test_maxpool_align_errors():
    with pytest.raises(ValueError, match=r"N_in=0"):
        ops.maxpool_align(torch.randn(0, 4), 3)
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        ops.maxpool_align(torch.ones(4, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"n_out=-1"):
        ops.maxpool_align(torch.randn(4, 3), -1)
