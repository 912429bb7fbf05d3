"""The extension's grouped CPU operators against per-group torch.mm, in float64."""

from __future__ import annotations

import pytest
import torch

from inhibmoe_fast import _extension

pytestmark = pytest.mark.skipif(not _extension.AVAILABLE, reason="inhibmoe_fast._C is not built")

ops = torch.ops.inhibmoe_fast

# Group sizes with empty groups at the start, in the middle and at the end.
SIZES = [0, 5, 1, 0, 9, 3, 0]


def _bounds(sizes):
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return ends, [0] + ends[:-1]


def _inputs(rows, width_in, width_out, groups, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width_in, generator=generator, dtype=dtype)
    weight = torch.randn(groups, width_out, width_in, generator=generator, dtype=dtype)
    grad_y = torch.randn(rows, width_out, generator=generator, dtype=dtype)
    return x, weight, grad_y


def test_rows_match_mm():
    ends, starts = _bounds(SIZES)
    x, weight, _ = _inputs(ends[-1], 6, 4, len(SIZES))
    y = ops.grouped_mm_rows(x, weight, ends)
    assert y.shape == (ends[-1], 4)
    for g, (start, end) in enumerate(zip(starts, ends)):
        assert torch.equal(y[start:end], torch.mm(x[start:end], weight[g].t())), f"group {g}"


def test_weight_grad_matches_mm():
    ends, starts = _bounds(SIZES)
    x, _, grad_y = _inputs(ends[-1], 6, 4, len(SIZES))
    grad_weight = ops.grouped_mm_weight_grad(grad_y, x, ends)
    assert grad_weight.shape == (len(SIZES), 4, 6)
    for g, (start, end) in enumerate(zip(starts, ends)):
        expected = torch.mm(grad_y[start:end].t(), x[start:end])
        torch.testing.assert_close(grad_weight[g], expected, rtol=1e-12, atol=1e-12, msg=f"group {g}")


def test_strided_inputs():
    """Transposed, sliced and expanded operands give the products of their contiguous copies."""
    ends, _ = _bounds(SIZES)
    x, weight, grad_y = _inputs(ends[-1], 6, 4, len(SIZES))
    wide = torch.randn(ends[-1], 12, dtype=torch.float64)[:, ::2]
    transposed = weight.transpose(1, 2).contiguous().transpose(1, 2)
    expanded = weight[:1].expand_as(weight)
    cases = [
        (ops.grouped_mm_rows(wide, weight, ends), ops.grouped_mm_rows(wide.contiguous(), weight, ends)),
        (ops.grouped_mm_rows(x, transposed, ends), ops.grouped_mm_rows(x, weight, ends)),
        (ops.grouped_mm_rows(x, expanded, ends), ops.grouped_mm_rows(x, expanded.contiguous(), ends)),
        (ops.grouped_mm_weight_grad(grad_y.t().contiguous().t(), wide, ends),
         ops.grouped_mm_weight_grad(grad_y, wide.contiguous(), ends)),
    ]
    for index, (got, expected) in enumerate(cases):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"case {index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_independent_of_thread_count(dtype):
    ends, _ = _bounds([40, 0, 17, 33, 8, 25, 1, 60])
    x, weight, grad_y = _inputs(ends[-1], 32, 24, 8, dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((ops.grouped_mm_rows(x, weight, ends), ops.grouped_mm_weight_grad(grad_y, x, ends)))
    finally:
        torch.set_num_threads(threads)
    for rows, grad_weight in results[1:]:
        assert torch.equal(rows, results[0][0])
        assert torch.equal(grad_weight, results[0][1])


def test_inputs_requiring_grad():
    """The operators run below autograd, so inputs that require grad are read like any others."""
    ends, _ = _bounds(SIZES)
    x, weight, grad_y = _inputs(ends[-1], 6, 4, len(SIZES))
    with torch.no_grad():
        y = ops.grouped_mm_rows(x.requires_grad_(), weight.requires_grad_(), ends)
    assert torch.equal(y, ops.grouped_mm_rows(x.detach(), weight.detach(), ends))


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda x, w, gy: ops.grouped_mm_rows(x, w, [3, 2, 10]), r"ends must be non-decreasing"),
        (lambda x, w, gy: ops.grouped_mm_rows(x, w, [3, 10]), r"ends has 2 entries; expected 3"),
        (lambda x, w, gy: ops.grouped_mm_rows(x, w, [3, 4, 9]), r"the last end is 9 but the input has 10 rows"),
        (lambda x, w, gy: ops.grouped_mm_rows(x, w.float(), [3, 4, 10]), r"dtypes Double and Float"),
        (lambda x, w, gy: ops.grouped_mm_rows(x[:, :5], w, [3, 4, 10]), r"x has 5 columns but weight has in=6"),
        (lambda x, w, gy: ops.grouped_mm_rows(x, w[0], [3, 4, 10]), r"expected \[G, out, in\]"),
        (lambda x, w, gy: ops.grouped_mm_rows(x.long(), w.long(), [3, 4, 10]), r"expected floating-point"),
        (lambda x, w, gy: ops.grouped_mm_weight_grad(gy[:9], x, [3, 4, 10]), r"expected \[M, out\] and \[M, in\]"),
        (lambda x, w, gy: ops.grouped_mm_weight_grad(gy, x, [3, -1, 10]), r"ends must be non-decreasing"),
    ],
)
def test_bad_arguments_rejected(call, pattern):
    x, weight, grad_y = _inputs(10, 6, 4, 3)
    with pytest.raises(RuntimeError, match=pattern):
        call(x, weight, grad_y)


def test_operators_are_differentiable():
    ends, _ = _bounds([2, 0, 3])
    x, weight, grad_y = _inputs(ends[-1], 3, 2, 3)
    x, weight, grad_y = x.requires_grad_(), weight.requires_grad_(), grad_y.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: ops.grouped_mm_rows(x, w, ends), (x, weight))
    assert torch.autograd.gradgradcheck(lambda x, w: ops.grouped_mm_rows(x, w, ends), (x, weight))
    assert torch.autograd.gradcheck(lambda gy, x: ops.grouped_mm_weight_grad(gy, x, ends), (grad_y, x))
    assert torch.autograd.gradgradcheck(lambda gy, x: ops.grouped_mm_weight_grad(gy, x, ends), (grad_y, x))


def test_operators_have_fake_kernels():
    x = torch.empty(10, 6, device="meta")
    weight = torch.empty(3, 4, 6, device="meta")
    assert ops.grouped_mm_rows(x, weight, [3, 4, 10]).shape == (10, 4)
    assert ops.grouped_mm_weight_grad(torch.empty(10, 4, device="meta"), x, [3, 4, 10]).shape == (3, 4, 6)
