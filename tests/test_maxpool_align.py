"""Tests of the maxpool_align operators against PyTorch's adaptive_max_pool1d.

The compiled kernels must return exactly the values, indices and gradients of
the CPU route ``adaptive_max_pool1d(x.t().unsqueeze(0), n_out)``: bit for bit,
with NaN compared by position. The CUDA tests run only where a GPU and the CUDA
kernels are present, and compare the CUDA kernels with the CPU kernels.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from inhibmoe_fast import _maxpool_op, ops

pytestmark = pytest.mark.skipif(not _maxpool_op.AVAILABLE, reason="inhibmoe_fast._C is not built")

OP = torch.ops.inhibmoe_fast
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# (N_in, C, n_out): n_out smaller, larger and equal to N_in, empty outputs, one
# input row, one column, windows of uneven length, and more columns than one CPU
# task handles (256).
SHAPES = [
    (64, 8, 16),
    (37, 5, 11),
    (16, 8, 64),
    (3, 300, 50),
    (37, 5, 37),
    (37, 5, 0),
    (1, 6, 5),
    (1, 6, 1),
    (50, 1, 7),
    (13, 257, 9),
    (1000, 3, 7),
    (7, 0, 3),
]


def torch_route(x: torch.Tensor, n_out: int):
    """Values and indices of adaptive_max_pool1d over the rows of a 2-D x."""
    if n_out == 0 or x.shape[1] == 0:
        # adaptive_max_pool1d rejects empty outputs.
        return ops._maxpool_align_torch(x, n_out)
    values, indices = F.adaptive_max_pool1d(x.t().unsqueeze(0), n_out, return_indices=True)
    return values[0].t(), indices[0].t()


# The gradient helpers keep x's strides: detach() shares storage and layout.
def torch_route_grad(x: torch.Tensor, n_out: int, grad_values: torch.Tensor) -> torch.Tensor:
    if n_out == 0 or x.shape[1] == 0:
        return torch.zeros(x.shape, dtype=x.dtype)
    leaf = x.detach().requires_grad_()
    values, _ = torch_route(leaf, n_out)
    values.backward(grad_values)
    return leaf.grad


def op_grad(x: torch.Tensor, n_out: int, grad_values: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    values, _ = ops.maxpool_align(leaf, n_out)
    values.backward(grad_values)
    return leaf.grad


def random_input(shape, dtype, seed, device="cpu"):
    """Seeded normal values with magnitudes spread over four decades, so sums round."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-2, 2, shape, generator=generator)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    """Assert equal shape, dtype and bits, with any NaN matching any NaN."""
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.cpu(), expected.cpu()
    if actual.is_floating_point():
        nan = actual.isnan()
        mismatch = nan != expected.isnan()
        as_int = _INT_VIEW[actual.dtype]
        same_bits = actual.contiguous().view(as_int) == expected.contiguous().view(as_int)
        mismatch |= ~nan & ~same_bits
    else:
        mismatch = actual != expected
    if mismatch.any():
        where = mismatch.nonzero()[:5].tolist()
        pairs = [(tuple(i), actual[tuple(i)].item(), expected[tuple(i)].item()) for i in where]
        pytest.fail(f"{label}: {int(mismatch.sum())} elements differ; first (index, actual, expected): {pairs}")


def check_against_torch(x: torch.Tensor, n_out: int, seed: int = 0) -> None:
    values, indices = ops.maxpool_align(x, n_out)
    rows = x.flatten(0, -2)
    expected_values, expected_indices = torch_route(rows, n_out)
    assert_identical(values, expected_values, "values")
    assert_identical(indices, expected_indices, "indices")

    grad_values = random_input((n_out, rows.shape[1]), x.dtype, seed + 1)
    assert_identical(op_grad(rows, n_out, grad_values), torch_route_grad(rows, n_out, grad_values), "grad_x")


# ---------------------------------------------------------------------------
# Parity with PyTorch on the CPU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch(shape, dtype):
    n_in, width, n_out = shape
    check_against_torch(random_input((n_in, width), dtype, seed=n_in * 1000 + width), n_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype):
    base = random_input((40, 30), dtype, seed=3)
    layouts = {
        "transposed": base.t(),
        "column step": base[:, ::3],
        "row step": base[::2],
        "offset": base[5:, 7:],
        "transposed offset": base[3:, 4:].t(),
        "broadcast row": base[0].expand(9, 30),
    }
    for name, x in layouts.items():
        assert not x.is_contiguous() or x.storage_offset() > 0, name
        for n_out in (4, x.shape[0], 2 * x.shape[0] + 1):
            check_against_torch(x, n_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_grad_values(dtype):
    x = random_input((12, 6), dtype, seed=4)
    n_out = 20
    grad_values = random_input((6, n_out), dtype, seed=5).t()
    assert_identical(op_grad(x, n_out, grad_values), torch_route_grad(x, n_out, grad_values), "grad_x")
    ones = torch.ones(1, 1, dtype=dtype).expand(n_out, 6)
    assert_identical(op_grad(x, n_out, ones), torch_route_grad(x, n_out, ones), "grad_x from expanded ones")


def test_leading_dimensions_are_flattened():
    x = random_input((2, 5, 7), torch.float32, seed=6)
    values, indices = ops.maxpool_align(x, 4)
    expected_values, expected_indices = torch_route(x.reshape(10, 7), 4)
    assert_identical(values, expected_values, "values")
    assert_identical(indices, expected_indices, "indices")
    leaf = x.clone().requires_grad_()
    ops.maxpool_align(leaf, 4)[0].sum().backward()
    assert leaf.grad.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_and_ties(dtype):
    nan, inf = float("nan"), float("inf")
    columns = [
        [1.0, nan, 3.0, nan, 5.0, 2.0],  # NaN: PyTorch reports the last NaN of the window
        [nan, 1.0, 2.0, 3.0, 4.0, nan],
        [-inf, -inf, -inf, -inf, -inf, -inf],  # all -inf: the window's first row
        [inf, 1.0, inf, 2.0, inf, inf],  # ties at +inf keep the first row
        [2.0, 2.0, 2.0, 1.0, 1.0, 1.0],  # ties keep the first row
        [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0],  # signed zeros compare equal, so the first row wins
        [-inf, nan, -inf, inf, nan, -inf],
    ]
    x = torch.tensor(columns, dtype=torch.float64).t().to(dtype)
    for n_out in range(1, 14):
        check_against_torch(x, n_out, seed=n_out)
    grad_special = torch.tensor([[nan, inf, -inf, -0.0, 1.0, 2.0, -inf]], dtype=dtype).expand(13, 7).contiguous()
    assert_identical(op_grad(x, 13, grad_special), torch_route_grad(x, 13, grad_special), "grad_x with inf and NaN")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_source_matches_torch(dtype):
    shapes = [(23, 5), (4, 300), (1, 2), (64, 0), (9, 1)]
    sources = [random_input(shape, dtype, seed=10 + i) for i, shape in enumerate(shapes)]
    sources[1] = sources[1][:, ::1].t().contiguous().t()  # column-major source
    for n_out in (0, 1, 7, 40):
        leaves = [s.clone().requires_grad_() for s in sources]
        values, indices = ops.maxpool_align_multi(leaves, n_out)
        pooled = [torch_route(s, n_out) for s in sources]
        assert_identical(values, torch.cat([v for v, _ in pooled], dim=1), f"values, n_out={n_out}")
        assert_identical(indices, torch.cat([i for _, i in pooled], dim=1), f"indices, n_out={n_out}")

        grad_values = random_input(tuple(values.shape), dtype, seed=n_out)
        values.backward(grad_values)
        offset = 0
        for i, (source, leaf) in enumerate(zip(sources, leaves)):
            width = source.shape[1]
            expected = torch_route_grad(source, n_out, grad_values[:, offset : offset + width])
            assert_identical(leaf.grad, expected, f"grad of sources[{i}], n_out={n_out}")
            offset += width


def test_multi_source_with_leading_dimensions():
    sources = [random_input((2, 3, 4), torch.float32, seed=20), random_input((5, 2), torch.float32, seed=21)]
    values, indices = ops.maxpool_align_multi(sources, 3)
    assert values.shape == (3, 6)
    assert indices.shape == (3, 6)
    assert_identical(values[:, :4], torch_route(sources[0].reshape(6, 4), 3)[0], "values of sources[0]")


def test_backward_is_deterministic():
    # Many overlapping windows per row and float16 rounding make the order visible.
    x = random_input((7, 513), torch.float16, seed=30)
    grad_values = random_input((300, 513), torch.float16, seed=31)
    first = op_grad(x, 300, grad_values)
    second = op_grad(x, 300, grad_values)
    assert_identical(first, second, "second backward run")


def test_double_backward():
    x = random_input((9, 4), torch.float64, seed=40).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: ops.maxpool_align(a, 13)[0], (x,))
    y = random_input((5, 3), torch.float64, seed=41).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: ops.maxpool_align_multi([a, b], 7)[0], (x, y))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n_in=st.integers(1, 40),
    width=st.integers(1, 12),
    n_out=st.integers(0, 60),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "column step", "offset"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_strides(n_in, width, n_out, dtype, layout, seed):
    if layout == "transposed":
        x = random_input((width, n_in), dtype, seed).t()
    elif layout == "column step":
        x = random_input((n_in, 2 * width), dtype, seed)[:, ::2]
    elif layout == "offset":
        x = random_input((n_in + 2, width + 1), dtype, seed)[2:, 1:]
    else:
        x = random_input((n_in, width), dtype, seed)
    check_against_torch(x, n_out, seed)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_empty_input_rows_rejected():
    with pytest.raises(ValueError, match="N_in=0"):
        ops.maxpool_align(torch.empty(0, 4), 3)
    with pytest.raises(RuntimeError, match=r"x has shape \[0, 4\], i.e. N_in=0 rows"):
        OP.maxpool_align(torch.empty(0, 4), 3)
    with pytest.raises(RuntimeError, match=r"sources\[1\] has shape \[0, 2\], i.e. N_in=0 rows"):
        OP.maxpool_align_multi([torch.randn(3, 2), torch.empty(0, 2)], 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_input_rejected(dtype):
    x = torch.ones(5, 3, dtype=dtype)
    with pytest.raises(TypeError, match="floating dtype"):
        ops.maxpool_align(x, 2)
    with pytest.raises(RuntimeError, match="x has dtype (Long|Int|Bool); expected a floating dtype"):
        OP.maxpool_align(x, 2)
    with pytest.raises(RuntimeError, match=r"sources\[0\] has dtype (Long|Int|Bool)"):
        OP.maxpool_align_multi([x], 2)


def test_invalid_arguments_rejected():
    with pytest.raises(RuntimeError, match="n_out=-1 is invalid"):
        OP.maxpool_align(torch.randn(4, 2), -1)
    with pytest.raises(RuntimeError, match=r"x has shape \[4\]; expected a 2-D tensor"):
        OP.maxpool_align(torch.randn(4), 2)
    with pytest.raises(ValueError, match="sources is empty"):
        ops.maxpool_align_multi([], 2)
    with pytest.raises(RuntimeError, match=r"sources\[1\] is Double on cpu but sources\[0\] is Float"):
        OP.maxpool_align_multi([torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64)], 2)
    values, indices = OP.maxpool_align(torch.randn(4, 2), 3)
    with pytest.raises(RuntimeError, match="indices has dtype Int; expected int64"):
        OP.maxpool_align_backward(values, indices.int(), 4)
    with pytest.raises(RuntimeError, match="n_in=0 is invalid|n_in\\[0\\]=0 is invalid"):
        OP.maxpool_align_backward(values, indices, 0)
    with pytest.raises(RuntimeError, match="widths sum to 3 but grad_values has 2 columns"):
        OP.maxpool_align_multi_backward(values, indices, [4, 4], [1, 2])


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_maxpool_op, "AVAILABLE", False)
    monkeypatch.setattr(ops, "_fallback_warned", False)
    x = random_input((10, 3), torch.float32, seed=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.maxpool_align(x, 4)
        ops.maxpool_align_multi([x, x], 4)
    assert len(caught) == 1
    assert "falls back" in str(caught[0].message)
    assert_identical(first[0], torch_route(x, 4)[0], "fallback values")


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------


def _opcheck_cases():
    x = random_input((7, 5), torch.float64, seed=60).requires_grad_()
    y = random_input((3, 2), torch.float64, seed=61).requires_grad_()
    _, indices = OP.maxpool_align(x.detach(), 11)
    _, multi_indices = OP.maxpool_align_multi([x.detach(), y.detach()], 6)
    grad = random_input((11, 5), torch.float64, seed=62).requires_grad_()
    multi_grad = random_input((6, 7), torch.float64, seed=63).requires_grad_()
    return [
        ("forward, n_out < N_in", OP.maxpool_align, (x, 4)),
        ("forward, n_out > N_in", OP.maxpool_align, (x, 11)),
        ("forward, n_out = 0", OP.maxpool_align, (x, 0)),
        ("forward, transposed", OP.maxpool_align, (x.detach().t().contiguous().t().requires_grad_(), 5)),
        ("backward", OP.maxpool_align_backward, (grad, indices, 7)),
        ("multi", OP.maxpool_align_multi, ([x, y], 6)),
        ("multi backward", OP.maxpool_align_multi_backward, (multi_grad, multi_indices, [7, 3], [5, 2])),
    ]


@pytest.mark.parametrize("index", range(len(_opcheck_cases())), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(index):
    _, op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    # aot_eager traces through the fake kernels and autograd formulas like inductor
    # does, without inductor's C++ compile time.
    def pooled_sum(x, context):
        values, _ = ops.maxpool_align(context, x.shape[0])
        multi, _ = ops.maxpool_align_multi([context, x], x.shape[0])
        return (values * x).sum() + multi.sum()

    compiled = torch.compile(pooled_sum, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n_in in (6, 9):
        x = random_input((n_in, 4), torch.float32, seed=70 + n_in).requires_grad_()
        context = random_input((13, 4), torch.float32, seed=71).requires_grad_()
        eager_x, eager_context = x.detach().clone().requires_grad_(), context.detach().clone().requires_grad_()
        compiled(x, context).backward()
        pooled_sum(eager_x, eager_context).backward()
        assert_identical(x.grad, eager_x.grad, f"compiled grad of x, n_in={n_in}")
        assert_identical(context.grad, eager_context.grad, f"compiled grad of context, n_in={n_in}")


# ---------------------------------------------------------------------------
# CUDA kernels against the CPU kernels
# ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _maxpool_op.has_cuda_kernels()), reason="needs a GPU and the CUDA kernels"
)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 300, 1000), (100, 70, 5000)], ids=str)
def test_cuda_matches_cpu(shape, dtype):
    n_in, width, n_out = shape
    x = random_input((n_in, width), dtype, seed=80)
    for layout, source in (("contiguous", x), ("transposed", x.t().contiguous().t()), ("offset", x[1:, 1:])):
        if source.shape[0] == 0:
            continue
        values, indices = OP.maxpool_align(source.cuda(), n_out)
        cpu_values, cpu_indices = OP.maxpool_align(source, n_out)
        assert_identical(values, cpu_values, f"{layout} values")
        assert_identical(indices, cpu_indices, f"{layout} indices")
        grad_values = random_input((n_out, source.shape[1]), dtype, seed=81)
        grad = OP.maxpool_align_backward(grad_values.cuda(), indices, source.shape[0])
        cpu_grad = OP.maxpool_align_backward(grad_values, cpu_indices, source.shape[0])
        assert_identical(grad, cpu_grad, f"{layout} grad_x")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_multi_source_matches_cpu(dtype):
    # 40 sources take two launches of at most 32 sources each.
    shapes = [(1 + 7 * i % 50, 1 + 3 * i % 20) for i in range(40)] + [(5, 0)]
    sources = [random_input(shape, dtype, seed=90 + i) for i, shape in enumerate(shapes)]
    for n_out in (0, 17, 64):
        values, indices = OP.maxpool_align_multi([s.cuda() for s in sources], n_out)
        cpu_values, cpu_indices = OP.maxpool_align_multi(sources, n_out)
        assert_identical(values, cpu_values, "values")
        assert_identical(indices, cpu_indices, "indices")
        grad_values = random_input(tuple(values.shape), dtype, seed=n_out)
        rows, widths = [s.shape[0] for s in sources], [s.shape[1] for s in sources]
        grads = OP.maxpool_align_multi_backward(grad_values.cuda(), indices, rows, widths)
        cpu_grads = OP.maxpool_align_multi_backward(grad_values, cpu_indices, rows, widths)
        for i, (grad, cpu_grad) in enumerate(zip(grads, cpu_grads)):
            assert_identical(grad, cpu_grad, f"grad of sources[{i}], n_out={n_out}")


@needs_cuda
def test_cuda_backward_is_deterministic():
    x = random_input((7, 513), torch.float16, seed=100, device="cuda")
    _, indices = OP.maxpool_align(x, 3000)
    grad_values = random_input((3000, 513), torch.float16, seed=101, device="cuda")
    first = OP.maxpool_align_backward(grad_values, indices, 7)
    second = OP.maxpool_align_backward(grad_values, indices, 7)
    assert_identical(first, second, "second backward run")
