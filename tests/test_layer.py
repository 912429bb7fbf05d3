"""The module API: shapes, backends, state_dict exchange and auxiliary outputs."""

from __future__ import annotations

import pickle

import pytest
import torch

from inhibmoe_fast import InhibitedMoE, MoEAux, ReferenceMoE

OPTION_SETS = [
    dict(inhibition="none"),
    dict(inhibition="local", gate_rank=3, expert_bias=True),
    dict(inhibition="global", context_dims=(5, 2), activation="gelu", router_bias=False),
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_state_dict_round_trip(options):
    torch.manual_seed(0)
    fast = InhibitedMoE(8, 6, 4, 2, **options)
    reference = ReferenceMoE(8, 6, 4, 2, **options)
    assert fast.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(fast.state_dict())
    copy = InhibitedMoE(8, 6, 4, 2, **options)
    copy.load_state_dict(reference.state_dict())
    for name, value in fast.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value), name
    x = torch.randn(5, 8)
    assert torch.allclose(copy(x), reference(x), atol=1e-6)


def test_parameter_names_and_shapes():
    layer = InhibitedMoE(8, 6, 4, 2, inhibition="global", gate_rank=3, context_dims=(5,), expert_bias=True)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "inhibit_u": (8, 3),
        "inhibit_v": (3, 8),
        "inhibit_bias": (8,),
        "context_weights.0": (8, 5),
        "router_weight": (4, 8),
        "router_bias": (4,),
        "expert_up": (4, 12, 8),
        "expert_down": (4, 8, 6),
        "expert_up_bias": (4, 12),
        "expert_down_bias": (4, 8),
    }


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_any_leading_shape(backend):
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2, backend=backend)
    for shape in [(8,), (3, 8), (2, 3, 8), (2, 1, 3, 8)]:
        x = torch.randn(shape)
        y = layer(x)
        tokens = x.numel() // 8
        assert y.shape == x.shape
        assert isinstance(layer.aux, MoEAux)
        assert layer.aux.ids.shape == (tokens, 2)
        assert layer.aux.logits.shape == (tokens, 4)
        assert layer.aux.counts.shape == (4,)


def test_strided_input_matches_contiguous():
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2)
    base = torch.randn(16, 10)
    x = base[::2, 1:9]
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_auto_backend_on_cpu_is_torch():
    layer = InhibitedMoE(8, 6, 4, 2)
    assert layer.resolved_backend(torch.device("cpu")) == "torch"


def test_aux_losses_values():
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2, inhibition="none", load_balance_coef=0.5, z_loss_coef=0.25)
    x = torch.randn(20, 8)
    layer(x)
    aux = layer.aux
    probs = torch.softmax(aux.logits, dim=-1)
    fraction = torch.bincount(aux.ids.reshape(-1), minlength=4).float() / 40
    expected_balance = 4 * (fraction * probs.mean(0)).sum()
    expected_z = torch.logsumexp(aux.logits, dim=-1).square().mean()
    assert torch.allclose(aux.load_balance_loss, expected_balance)
    assert torch.allclose(aux.z_loss, expected_z)
    assert torch.allclose(aux.loss, 0.5 * expected_balance + 0.25 * expected_z)


def test_aux_loss_trains_router():
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2, inhibition="local", load_balance_coef=1.0)
    layer(torch.randn(20, 8))
    layer.aux.loss.backward()
    assert layer.router_weight.grad.abs().sum() > 0
    assert layer.inhibit_weight.grad.abs().sum() > 0


def test_low_rank_gate_matches_full_gate():
    torch.manual_seed(0)
    low_rank = InhibitedMoE(8, 6, 4, 2, inhibition="local", gate_rank=3, dtype=torch.float64)
    full = InhibitedMoE(8, 6, 4, 2, inhibition="local", dtype=torch.float64)
    state = {k: v for k, v in low_rank.state_dict().items() if not k.startswith("inhibit_")}
    state["inhibit_weight"] = low_rank.inhibit_u @ low_rank.inhibit_v
    state["inhibit_bias"] = low_rank.inhibit_bias
    full.load_state_dict(state)
    x = torch.randn(7, 8, dtype=torch.float64)
    assert torch.allclose(low_rank(x), full(x), atol=1e-12)


def test_layer_moves_dtype():
    layer = InhibitedMoE(8, 6, 4, 2).to(torch.float64)
    y = layer(torch.randn(3, 8, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert layer.aux.logits.dtype == torch.float64


def test_numpy_integer_sizes_accepted():
    import numpy as np

    layer = InhibitedMoE(np.int64(8), np.int32(6), np.int64(4), top_k=np.int64(2), gate_rank=np.int64(3))
    assert type(layer.config.top_k) is int
    assert type(layer.config.gate_rank) is int
    assert layer(torch.randn(3, 8)).shape == (3, 8)


@pytest.mark.parametrize("cls", [InhibitedMoE, ReferenceMoE])
def test_deepcopy_and_save_after_forward(cls, tmp_path):
    import copy

    layer = cls(8, 6, 4, 2)
    layer(torch.randn(3, 8))
    duplicate = copy.deepcopy(layer)
    assert duplicate.aux is None, "a copy starts without the last call's graph"
    assert layer.aux is not None
    torch.save(layer, tmp_path / "layer.pt")
    x = torch.randn(5, 8)
    assert torch.equal(duplicate(x), layer(x))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_batch_with_context_gradient(backend):
    layer = InhibitedMoE(8, 6, 4, 2, backend=backend, inhibition="global", context_dims=(3,))
    source = torch.randn(5, 3, requires_grad=True)
    layer(torch.randn(0, 8, requires_grad=True), [source]).sum().backward()
    assert torch.equal(source.grad, torch.zeros_like(source))


@pytest.mark.parametrize("options", OPTION_SETS)
def test_torch_compile_matches_eager(options):
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2, **options)
    x = torch.randn(10, 8, requires_grad=True)
    context = [torch.randn(7, 5), torch.randn(3, 2)] if options["inhibition"] == "global" else None
    eager = layer(x, context)
    eager.sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(layer, backend="aot_eager")(x, context)
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert torch.allclose(x.grad, eager_grad, atol=1e-5)


@pytest.mark.parametrize(
    "factor,tokens,top_k,experts,expected",
    [
        (1.1, 90, 1, 3, 33),  # 1.1 * 90 / 3 is 33.000000000000004 in float arithmetic
        (1.1, 30, 1, 3, 11),
        (0.3, 10, 1, 1, 3),  # 0.3 * 10 is 3.0000000000000004 in float arithmetic
        (1.25, 10, 2, 4, 7),  # 6.25 rounds up
        (2, 5, 1, 5, 2),
    ],
)
def test_capacity_is_exact(factor, tokens, top_k, experts, expected):
    layer = InhibitedMoE(4, 4, experts, top_k, capacity_factor=factor)
    assert layer.config.capacity(tokens) == expected


def test_capacity_ratio_has_small_terms():
    """A factor such as 4/3 becomes the fraction 4/3, so the symbolic capacity of a compiled
    layer stays inside int64; a factor too large to drop anything keeps every token."""
    cfg = InhibitedMoE(4, 4, 4, 2, capacity_factor=4 / 3).config
    assert cfg._capacity_ratio == (4, 3)
    assert cfg.capacity(3 * 10**12) == 2 * 10**12
    assert InhibitedMoE(4, 4, 4, 2, capacity_factor=1e-7).config._capacity_ratio == (1, 10**7)
    for factor in (2.0, 1e20):
        assert InhibitedMoE(4, 4, 4, 2, capacity_factor=factor).config.capacity(10**15) == 10**15


def test_config_pickled_without_capacity_ratio_loads():
    """Layers saved whole by earlier versions hold configs without the cached capacity ratio."""
    cfg = InhibitedMoE(4, 4, 3, 1, capacity_factor=1.1).config
    state = dict(cfg.__dict__)
    del state["_capacity_ratio"]
    restored = object.__new__(type(cfg))
    restored.__setstate__(state)
    assert restored.capacity(90) == 33
    assert pickle.loads(pickle.dumps(cfg)).capacity(90) == 33


def test_numpy_numbers_accepted_as_options():
    np = pytest.importorskip("numpy")
    layer = InhibitedMoE(np.int64(8), 4, 4, 2, inhibition="dropout", capacity_factor=np.float32(1.0),
                         dropout_p=np.float64(0.25), load_balance_coef=np.float32(0.5))
    cfg = layer.config
    assert (cfg.capacity_factor, cfg.dropout_p, cfg.load_balance_coef) == (1.0, 0.25, 0.5)
    assert all(type(v) is float for v in (cfg.capacity_factor, cfg.dropout_p, cfg.load_balance_coef))


def test_dropout_p_default_only_for_dropout():
    assert InhibitedMoE(8, 4, 4, 2, inhibition="dropout").config.dropout_p == 0.75
    assert InhibitedMoE(8, 4, 4, 2, inhibition="local").config.dropout_p is None


@pytest.mark.parametrize("cls,backend", [(ReferenceMoE, None), (InhibitedMoE, "reference"), (InhibitedMoE, "torch")])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_in_parameter_dtype(cls, backend, input_dtype):
    """Under autocast the layer casts x to its parameters' dtype and computes as without autocast."""
    torch.manual_seed(0)
    layer = cls(16, 12, 6, 2, inhibition="local") if backend is None else cls(16, 12, 6, 2, inhibition="local", backend=backend)
    x = torch.randn(4, 5, 16).to(input_dtype).requires_grad_()
    expected = layer(x.detach().float())
    expected_logits = layer.aux.logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(layer.aux.logits, expected_logits), "routing must not run in bfloat16 under autocast"
    assert torch.equal(y, expected)
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == input_dtype
