"""Triton expert and combine kernels against a float64 loop: outputs, every gradient, hard cases, autotuning.

Without a GPU the kernels run on CPU tensors through the Triton interpreter,
because this module sets ``TRITON_INTERPRET=1`` before it imports them. With a
GPU they are compiled and the tests run on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from inhibmoe_fast import InhibitedMoE, ReferenceMoE  # noqa: E402
from inhibmoe_fast.expert_ops import experts  # noqa: E402
from inhibmoe_fast.kernels import experts as kernels  # noqa: E402

from conftest import TOLERANCES, assert_close  # noqa: E402
from test_parity import CONFIGS, _compare, _inputs  # noqa: E402

# The interpreter computes with numpy, which warns on the NaN and infinite values some routing cases produce.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"
if DEVICE == "cpu" and not kernels.INTERPRETED:
    pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set and no GPU is present",
                allow_module_level=True)

GRAD_NAMES = ("x", "weights", "up", "up_bias", "down", "down_bias")


def make_problem(tokens=11, dim=24, hidden=20, experts=5, k=2, activation="swiglu", bias=True, seed=0, ids=None):
    """Draw seeded float64 expert inputs on the CPU: a dict of tensors (biases may be None) and the ids."""
    generator = torch.Generator().manual_seed(seed)
    up_width = 2 * hidden if activation == "swiglu" else hidden

    def draw(*shape, std=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std

    if ids is None:
        ids = torch.randn(tokens, experts, generator=generator).topk(k, dim=-1).indices
    tensors = dict(
        x=draw(tokens, dim), weights=torch.rand(tokens, k, generator=generator, dtype=torch.float64),
        up=draw(experts, up_width, dim, std=dim ** -0.5), up_bias=draw(experts, up_width, std=0.5) if bias else None,
        down=draw(experts, dim, hidden, std=hidden ** -0.5), down_bias=draw(experts, dim, std=0.5) if bias else None,
    )
    return tensors, ids


def loop_experts(tensors, ids, activation, capacity=None):
    """The experts and combine as a plain loop over experts in the dtype of ``x``, combined in float64."""
    x, weights = tensors["x"], tensors["weights"]
    num_tokens, k = ids.shape
    y = torch.zeros(num_tokens, x.shape[1], dtype=torch.float64)
    flat = ids.reshape(-1)
    for e in range(tensors["up"].shape[0]):
        pairs = (flat == e).nonzero().squeeze(1)
        if capacity is not None:
            pairs = pairs[:capacity]
        tokens = pairs // k
        pre = F.linear(x[tokens], tensors["up"][e], None if tensors["up_bias"] is None else tensors["up_bias"][e])
        if activation == "swiglu":
            gate, up = pre.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(pre) if activation == "gelu" else F.relu(pre)
        out = F.linear(hidden, tensors["down"][e], None if tensors["down_bias"] is None else tensors["down_bias"][e])
        y = y.index_add(0, tokens, out.double() * weights.reshape(-1)[pairs].double()[:, None])
    return y.to(x.dtype)  # the layer returns the dtype of x


def reference_grads(tensors, ids, activation, grad_y, capacity=None, dtype=torch.float64):
    """Output and gradients of :func:`loop_experts` computed in ``dtype`` (the combine weights stay float64)."""
    leaves = {}
    for name, tensor in tensors.items():
        if tensor is not None:
            tensor = tensor if name == "weights" else tensor.to(dtype)
            tensor = tensor.detach().requires_grad_()
        leaves[name] = tensor
    y = loop_experts(leaves, ids, activation, capacity)
    y.backward(grad_y.to(y.dtype))
    return y.detach().double(), {name: None if t is None else t.grad for name, t in leaves.items()}


def run_kernels(tensors, ids, activation, grad_y, dtype, capacity=None, autotune=False):
    """Forward and backward of the kernels in ``dtype`` on DEVICE; return ``(y, grads, layout)``."""
    cast = {name: None if t is None else t.to(DEVICE, torch.float32 if name == "weights" else dtype)
            for name, t in tensors.items()}
    layout = kernels.expert_layout(ids.to(DEVICE), tensors["up"].shape[0], capacity)
    args = (cast["x"], cast["weights"], layout, cast["up"], cast["up_bias"], cast["down"], cast["down_bias"],
            activation)
    forward = kernels.experts_forward(*args, autotune=autotune)
    grads = kernels.experts_backward(grad_y.to(DEVICE, dtype), *args, forward, autotune=autotune)
    return forward.y, dict(zip(GRAD_NAMES, grads)), layout


def check_against_loop(tensors, ids, activation, dtype=torch.float32, capacity=None, seed=3):
    generator = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(tensors["x"].shape, generator=generator, dtype=torch.float64)
    y, grads, _ = run_kernels(tensors, ids, activation, grad_y, dtype, capacity)
    y_ref, grads_ref = reference_grads(tensors, ids, activation, grad_y.to(dtype), capacity)
    if dtype == torch.float32:
        atol, rtol = 2e-5, 1e-4
        bounds = None
    else:
        # 16-bit kernels are held to twice the error of the same loop run in that dtype.
        atol = rtol = None
        y_low, grads_low = reference_grads(tensors, ids, activation, grad_y.to(dtype), capacity, dtype)
        bounds = {"y": (y_low.double() - y_ref).abs().max().item()}
        bounds.update({name: (grads_low[name].double() - grads_ref[name]).abs().max().item()
                       for name in grads_ref if grads_ref[name] is not None})
    pairs = [("y", y, y_ref)] + [(name, grads[name], grads_ref[name]) for name in GRAD_NAMES]
    for name, got, expected in pairs:
        if expected is None:
            assert got is None, f"grad of {name}: expected None"
            continue
        assert got.dtype == (torch.float32 if name == "weights" else dtype), f"{name} has dtype {got.dtype}"
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"{name} is not finite"
        if bounds is None:
            assert_close(got, expected, name, atol, rtol)
        else:
            error = (got - expected).abs().max().item()
            assert error <= 2 * bounds[name] + 1e-3, f"{name}: error {error:.3g}, same-dtype loop {bounds[name]:.3g}"


@pytest.mark.parametrize("capacity", [None, 3], ids=["dropless", "capacity"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_kernels_match_loop(activation, bias, capacity):
    tensors, ids = make_problem(activation=activation, bias=bias)
    check_against_loop(tensors, ids, activation, capacity=capacity)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_16_bit_within_twice_the_loop_error(activation, dtype):
    tensors, ids = make_problem(tokens=19, dim=40, hidden=24, experts=4, k=2, activation=activation)
    check_against_loop(tensors, ids, activation, dtype=dtype)


@pytest.mark.parametrize("tokens,dim,hidden,experts,k", [
    (1, 16, 16, 1, 1),  # one token, one expert
    (5, 13, 7, 3, 3),  # k = E, widths below every block
    (40, 70, 45, 8, 2),  # widths not multiples of the block sizes, rows over one tile
    (3, 16, 16, 64, 2),  # most experts get no pair
])
def test_shapes(tokens, dim, hidden, experts, k):
    tensors, ids = make_problem(tokens, dim, hidden, experts, k)
    check_against_loop(tensors, ids, "swiglu")


@pytest.mark.parametrize("tokens", [1, 4, 63, 64, 65])
def test_all_tokens_to_one_expert(tokens):
    ids = torch.zeros(tokens, 1, dtype=torch.long)
    tensors, _ = make_problem(tokens, 16, 12, 8, 1, ids=ids)
    layout = kernels.expert_layout(ids.to(DEVICE), 8)
    assert layout.counts.tolist() == [tokens] + [0] * 7
    assert layout.offsets.tolist() == [0] + [tokens] * 8
    assert layout.order.tolist() == list(range(tokens))
    check_against_loop(tensors, ids, "swiglu")


def test_capacity_drops_exactly():
    # Six tokens to expert 0, capacity 4: tokens 4 and 5 get zero output and zero gradients.
    ids = torch.zeros(6, 1, dtype=torch.long)
    tensors, _ = make_problem(6, 16, 12, 2, 1, ids=ids)
    grad_y = torch.ones(6, 16, dtype=torch.float64)
    y, grads, layout = run_kernels(tensors, ids, "swiglu", grad_y, torch.float32, capacity=4)
    assert layout.kept.view(-1).tolist() == [True] * 4 + [False] * 2
    assert layout.row_of_pair.tolist() == [0, 1, 2, 3, -1, -1]
    assert torch.equal(y[4:].cpu(), torch.zeros(2, 16))
    assert torch.equal(grads["x"][4:].cpu(), torch.zeros(2, 16))
    assert torch.equal(grads["weights"][4:].cpu(), torch.zeros(2, 1))
    check_against_loop(tensors, ids, "swiglu", capacity=4)


def test_nan_weight_of_dropped_pair_stays_out():
    ids = torch.zeros(3, 1, dtype=torch.long)
    tensors, _ = make_problem(3, 16, 12, 2, 1, ids=ids)
    tensors["weights"][2] = float("nan")
    y, _, _ = run_kernels(tensors, ids, "swiglu", torch.ones(3, 16, dtype=torch.float64), torch.float32, capacity=2)
    assert torch.isfinite(y).all()
    assert torch.equal(y[2].cpu(), torch.zeros(16))


def test_empty_batch():
    tensors, ids = make_problem(0, 16, 12, 4, 2, ids=torch.zeros(0, 2, dtype=torch.long))
    y, grads, _ = run_kernels(tensors, ids, "swiglu", torch.zeros(0, 16, dtype=torch.float64), torch.float32)
    assert y.shape == (0, 16)
    assert grads["x"].shape == (0, 16)
    assert grads["weights"].shape == (0, 2)
    for name in ("up", "up_bias", "down", "down_bias"):
        assert torch.equal(grads[name].cpu(), torch.zeros(grads[name].shape)), f"grad of {name} is not zero"


def test_repeated_runs_are_bit_identical():
    # The combine of one token adds 1e4, -1e4 and 1: any change of summation order would show.
    tensors, ids = make_problem(33, 24, 16, 6, 3, seed=4)
    tensors["weights"][0] = torch.tensor([1e4, -1e4, 1.0], dtype=torch.float64)
    grad_y = torch.randn(33, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = run_kernels(tensors, ids, "swiglu", grad_y, torch.float32)
    second = run_kernels(tensors, ids, "swiglu", grad_y, torch.float32)
    assert torch.equal(first[0], second[0])
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), f"grad of {name} differs between runs"


def test_autotuned_first_call_equals_second_and_loop():
    # The autotuner runs each candidate configuration on the real buffers before the first result
    # is kept, so a kernel that accumulated into its output would give a wrong first result.
    tensors, ids = make_problem(37, 24, 20, 4, 2, activation="gelu", seed=6)
    grad_y = torch.randn(37, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = run_kernels(tensors, ids, "gelu", grad_y, torch.float32, capacity=15, autotune=True)
    second = run_kernels(tensors, ids, "gelu", grad_y, torch.float32, capacity=15, autotune=True)
    fixed = run_kernels(tensors, ids, "gelu", grad_y, torch.float32, capacity=15, autotune=False)
    y_ref, grads_ref = reference_grads(tensors, ids, "gelu", grad_y, capacity=15)
    assert torch.equal(first[0], second[0])
    assert_close(first[0].double().cpu(), y_ref, "autotuned y", 2e-5, 1e-4)
    assert_close(fixed[0].double().cpu(), y_ref, "fixed-configuration y", 2e-5, 1e-4)
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), f"autotuned grad of {name} differs between calls"
        assert_close(first[1][name].double().cpu(), grads_ref[name], f"autotuned grad of {name}", 2e-5, 1e-4)
    if DEVICE == "cpu":
        tuned = kernels._tuned_kernel("matmul", "interpreter")
        assert len(tuned.cache) > 0, "the autotuner kept no configuration"


def test_row_offsets_beyond_int32():
    # x rows 2**20 elements apart: the last gathered rows start past element 2**31, so the
    # gathers of the forward and of the up-projection weight gradient need 64-bit offsets.
    # Only the touched pages of the large buffer are committed.
    tokens, dim, row_stride = 2048 + 5, 16, 2 ** 20
    storage = torch.empty(tokens * row_stride, dtype=torch.bfloat16, device=DEVICE)
    x = storage.as_strided((tokens, dim), (row_stride, 1))
    tensors, ids = make_problem(tokens, dim, 16, 2, 1, activation="relu", bias=False, seed=8)
    x.copy_(tensors["x"].to(torch.bfloat16))
    assert x.storage_offset() + (tokens - 1) * row_stride > 2 ** 31
    tensors["x"] = tensors["x"].to(torch.bfloat16).double()
    cast = {name: None if t is None else t.to(DEVICE, torch.float32 if name == "weights" else torch.bfloat16)
            for name, t in tensors.items()}
    layout = kernels.expert_layout(ids.to(DEVICE), 2)
    args = (x, cast["weights"], layout, cast["up"], None, cast["down"], None, "relu")
    forward = kernels.experts_forward(*args)
    grad_y = torch.ones(tokens, dim, dtype=torch.bfloat16, device=DEVICE)
    grads = kernels.experts_backward(grad_y, *args, forward)
    dense = (x.contiguous(), *args[1:])
    dense_forward = kernels.experts_forward(*dense)
    dense_grads = kernels.experts_backward(grad_y, *dense, dense_forward)
    assert torch.equal(forward.y, dense_forward.y)
    for name, got, expected in zip(GRAD_NAMES, grads, dense_grads):
        if expected is not None:
            assert torch.equal(got, expected), f"grad of {name} differs for strided x"


def test_bad_arguments_are_named():
    tensors, ids = make_problem(4, 16, 12, 3, 2)
    cast = {name: None if t is None else t.to(DEVICE, torch.float32) for name, t in tensors.items()}
    layout = kernels.expert_layout(ids.to(DEVICE), 3)
    good = dict(x=cast["x"], weights=cast["weights"], layout=layout, up=cast["up"], up_bias=cast["up_bias"],
                down=cast["down"], down_bias=cast["down_bias"], activation="swiglu")
    with pytest.raises(ValueError, match="activation='tanh'"):
        kernels.check_expert_inputs(**{**good, "activation": "tanh"})
    with pytest.raises(ValueError, match=r"down has shape \(3, 16, 11\)"):
        kernels.check_expert_inputs(**{**good, "down": cast["down"][:, :, :11]})
    with pytest.raises(TypeError, match="weights has dtype torch.float64"):
        kernels.check_expert_inputs(**{**good, "weights": cast["weights"].double()})
    with pytest.raises(TypeError, match="up has dtype torch.bfloat16"):
        kernels.check_expert_inputs(**{**good, "up": cast["up"].bfloat16()})
    with pytest.raises(ValueError, match="layout.order has shape"):
        kernels.check_expert_inputs(**{**good, "layout": layout._replace(order=layout.order[:-1])})


# ---------------------------------------------------------------------------
# The layer on the Triton backend
# ---------------------------------------------------------------------------


def test_layer_under_autocast_runs_in_parameter_dtype():
    torch.manual_seed(0)
    layer = InhibitedMoE(16, 12, 6, 2, backend="triton", device=DEVICE, inhibition="local")
    x = torch.randn(3, 16, device=DEVICE).to(torch.bfloat16)
    expected = layer(x.float())
    expected_logits = layer.aux.logits
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(layer.aux.logits, expected_logits)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_reference(name):
    options = CONFIGS[name]
    torch.manual_seed(0)
    reference = ReferenceMoE(16, 12, 6, 2, dtype=torch.float32, **options)
    layer = InhibitedMoE(16, 12, 6, 2, backend="triton", dtype=torch.float32, **options)
    layer.load_state_dict(reference.state_dict())
    x, context = _inputs(torch.float32, context_dims=options.get("context_dims", ()))
    if DEVICE != "cpu":
        reference, layer, x = reference.to(DEVICE), layer.to(DEVICE), x.to(DEVICE)
        context = None if context is None else [c.to(DEVICE) for c in context]
    _compare(reference, layer, x, context, torch.float32)


def test_operators_pass_opcheck():
    tensors, ids = make_problem(9, 16, 12, 4, 2, activation="gelu")
    cast = {name: None if t is None else t.to(DEVICE, torch.float32) for name, t in tensors.items()}
    for name in ("x", "weights", "up", "up_bias", "down", "down_bias"):
        cast[name].requires_grad_()
    for capacity in (None, 4):
        layout = kernels.expert_layout(ids.to(DEVICE), 4, capacity)
        args = (cast["x"], cast["weights"], cast["up"], cast["up_bias"], cast["down"], cast["down_bias"],
                layout.order, layout.offsets, layout.counts, layout.row_of_pair, layout.top_k, layout.capacity,
                "gelu", False)
        torch.library.opcheck(torch.ops.inhibmoe_fast.triton_experts, args)
        with torch.no_grad():
            y, pre, hidden, out = torch.ops.inhibmoe_fast.triton_experts(*args)
        grad_y = torch.randn_like(y)
        tensors = [t.detach() if isinstance(t, torch.Tensor) else t for t in args[:10]]
        for needs in ([True] * 6, [True, False, False, True, True, False]):
            backward_args = (grad_y, *tensors[:6], *tensors[6:10], pre, hidden, out, *args[10:], needs)
            torch.library.opcheck(torch.ops.inhibmoe_fast.triton_experts_backward, backward_args)


def test_layer_experts_function_gradients():
    # experts() is the entry point of the layer: its autograd matches the kernels' backward.
    tensors, ids = make_problem(10, 16, 12, 4, 2)
    cast = {name: t.to(DEVICE, torch.float32).requires_grad_() for name, t in tensors.items()}
    layout = kernels.expert_layout(ids.to(DEVICE), 4)
    y = experts(cast["x"], cast["weights"], layout, cast["up"], cast["up_bias"], cast["down"], cast["down_bias"],
                "swiglu")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    y.backward(grad_y)
    y_ref, grads_ref = reference_grads(tensors, ids, "swiglu", grad_y.double().cpu())
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(y.detach().double().cpu(), y_ref, "y", atol, 1e-4)
    for name in GRAD_NAMES:
        assert_close(cast[name].grad.double().cpu(), grads_ref[name], f"grad of {name}", atol, 1e-4)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("options", [
    dict(inhibition="local"),
    dict(inhibition="global", context_dims=(5,), gate_rank=4, capacity_factor=0.7),
    dict(inhibition="dropout", inhibit_experts=True, activation="gelu", expert_bias=True),
], ids=["local", "global-capacity", "dropout-gelu"])
def test_layer_compiles_fullgraph(options, dynamic):
    # Every kernel is a torch.library operator with a fake kernel, so the whole layer traces as one graph.
    torch.manual_seed(0)
    layer = InhibitedMoE(16, 12, 4, 2, backend="triton", device=DEVICE, **options)
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    context = [torch.randn(7, 5, device=DEVICE)] if options["inhibition"] == "global" else None

    def loss(x, context):
        return layer(x, context).square().sum() + layer.aux.loss

    def run(function):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout mask in both runs
        value = function(x, context)
        value.backward()
        return value.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}

    eager = run(loss)
    compiled = run(torch.compile(loss, fullgraph=True, dynamic=dynamic, backend="aot_eager"))
    assert_close(compiled[0], eager[0], "loss", 1e-6, 1e-6)
    assert_close(compiled[1], eager[1], "grad of x", 1e-6, 1e-6)
    assert compiled[2].keys() == eager[2].keys()
    for name in eager[2]:
        assert_close(compiled[2][name], eager[2][name], f"grad of {name}", 1e-6, 1e-6)


def test_deterministic_mode_switch():
    from inhibmoe_fast import settings

    assert settings.is_deterministic()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        settings.set_deterministic(1)
    torch.manual_seed(0)
    layer = InhibitedMoE(16, 12, 4, 2, backend="triton", device=DEVICE, inhibition="local")
    x = torch.randn(21, 16, device=DEVICE)
    fixed = layer(x)
    settings.set_deterministic(False)
    try:
        assert not settings.is_deterministic()
        first, second = layer(x), layer(x)
        with _deterministic_algorithms():
            assert settings.is_deterministic()
    finally:
        settings.set_deterministic(True)
    assert torch.equal(first, second)
    assert_close(first, fixed, "autotuned output", 1e-6, 1e-5)


class _deterministic_algorithms:
    """Turn on ``torch.use_deterministic_algorithms`` for a ``with`` block."""

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)


def test_layer_strided_input_and_parameters():
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 4, 2, backend="triton", device=DEVICE, expert_bias=True)
    x = torch.randn(16, 10, device=DEVICE)[::2, 1:9]
    assert not x.is_contiguous()
    expected = layer(x.contiguous())
    assert torch.equal(layer(x), expected)
    # A transposed copy of the expert weights (same values, other strides) gives the same output.
    with torch.no_grad():
        layer.expert_down = torch.nn.Parameter(layer.expert_down.transpose(1, 2).contiguous().transpose(1, 2))
    assert layer.expert_down.stride(-1) != 1
    assert torch.equal(layer(x), expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA notion")
def test_layer_runs_without_host_sync():
    torch.manual_seed(0)
    layer = InhibitedMoE(64, 32, 8, 2, backend="triton", device="cuda", dtype=torch.bfloat16, inhibition="local",
                         gate_rank=16, capacity_factor=1.0, load_balance_coef=0.01)
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # compiles the kernels outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        (y.float().square().mean() + layer.aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("experts", [257, 300])
def test_more_experts_than_one_search_block(experts):
    # The tile-to-expert search walks the experts in blocks of 256.
    ids = torch.tensor([[5], [100], [experts - 2], [experts - 1], [255], [256], [5]])
    tensors, _ = make_problem(7, 8, 4, experts, 1, ids=ids)
    check_against_loop(tensors, ids, "swiglu")
    check_against_loop(tensors, ids, "swiglu", capacity=1)


def test_layer_with_many_experts_matches_reference():
    torch.manual_seed(0)
    reference = ReferenceMoE(8, 4, 300, 2, inhibition="local")
    layer = InhibitedMoE(8, 4, 300, 2, backend="triton", device=DEVICE, inhibition="local")
    layer.load_state_dict(reference.state_dict())
    x, _ = _inputs(torch.float32, tokens=(40,), dim=8)
    if DEVICE != "cpu":
        reference, layer, x = reference.to(DEVICE), layer.to(DEVICE), x.to(DEVICE)
    _compare(reference, layer, x, None, torch.float32)


def test_strided_weights():
    tensors, ids = make_problem(6, 16, 12, 3, 2)
    cast = {name: t.to(DEVICE, torch.float32) for name, t in tensors.items()}
    layout = kernels.expert_layout(ids.to(DEVICE), 3)
    strided = torch.zeros(6, 4, device=DEVICE)[:, :2].copy_(cast["weights"])
    assert not strided.is_contiguous()
    args = (cast["up"], cast["up_bias"], cast["down"], cast["down_bias"], "swiglu")
    expected = experts(cast["x"], cast["weights"], layout, *args)
    assert torch.equal(experts(cast["x"], strided, layout, *args), expected)
    with pytest.raises(ValueError, match="weights has strides"):
        kernels.experts_forward(cast["x"], strided, layout, *args)


def test_layout_arguments_are_checked():
    ids = torch.tensor([[0, 1], [2, 0]], device=DEVICE)
    with pytest.raises(ValueError, match=r"capacity=-1 is invalid"):
        kernels.expert_layout(ids, 3, capacity=-1)
    with pytest.raises(ValueError, match=r"capacity=1.5 is invalid"):
        kernels.expert_layout(ids, 3, capacity=1.5)
    with pytest.raises(ValueError, match=r"num_experts=0 is invalid"):
        kernels.expert_layout(ids, 0)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\) .* from 0 to 2"):
        kernels.expert_layout(ids, 2)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\) .* from -1 to 1"):
        kernels.expert_layout(ids - 1, 3)
    with pytest.raises(ValueError, match=r"ids must be an int64 tensor \[N, k\]"):
        kernels.expert_layout(ids.reshape(-1), 3)
    layout = kernels.expert_layout(ids, 3, capacity=0)
    assert layout.row_of_pair.tolist() == [-1, -1, -1, -1]


def test_second_order_gradients_raise():
    torch.manual_seed(0)
    layer = InhibitedMoE(8, 6, 3, 2, backend="triton", device=DEVICE, inhibition="local")
    x = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients of the Triton .* are not supported"):
        grad.sum().backward()
