"""The test harness's own promises: poisoning, tolerances, tie-robust top-k, strategies."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proxykv.testing import TOLERANCES, assert_close, assert_same_topk_scores
from proxykv.testing import strategies as pst


def test_empty_allocations_are_poisoned():
    assert torch.empty(4).isnan().all()
    assert torch.empty_like(torch.zeros(3, dtype=torch.float16)).isnan().all()
    assert (torch.empty(2, dtype=torch.int32) == torch.iinfo(torch.int32).min).all()


def test_assert_close_flags_nan_from_an_unwritten_element():
    expected = torch.zeros(5)
    actual = torch.zeros(5)
    actual[3] = float("nan")
    with pytest.raises(AssertionError, match=r"1 NaN where a value was expected; worst at \(3,\)"):
        assert_close(actual, expected)


def test_assert_close_requires_matching_infinities():
    expected = torch.tensor([0.0, float("-inf")])
    assert_close(expected.clone(), expected)
    with pytest.raises(AssertionError, match="1 of 2 elements differ"):
        assert_close(torch.tensor([0.0, -1e30]), expected)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_tolerance_table_accepts_within_and_rejects_beyond(dtype):
    atol, rtol = TOLERANCES[dtype]
    expected = torch.ones(3)
    assert_close(expected + 0.5 * (atol + rtol), expected, dtype=dtype)
    with pytest.raises(AssertionError):
        assert_close(expected + 3 * (atol + rtol), expected, dtype=dtype)


def test_topk_comparison_accepts_ties_and_rejects_other_scores():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert_same_topk_scores(scores, torch.tensor([[0, 1]]), torch.tensor([[2, 0]]))
    with pytest.raises(AssertionError, match="chosen scores differ"):
        assert_same_topk_scores(scores, torch.tensor([[0, 1]]), torch.tensor([[0, 3]]))
    with pytest.raises(AssertionError, match="repeats a position"):
        assert_same_topk_scores(scores, torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 5)),
       layout=pst.layouts(), dtype=pst.dtypes())
def test_make_bhtd_gives_the_layout_it_promises(shape, layout, dtype):
    tensor = pst.make_bhtd(shape, dtype, layout, torch.Generator().manual_seed(1))
    assert tensor.shape == shape and tensor.dtype == dtype
    if layout == "bthd":
        assert tensor.stride()[1] == shape[3]
    if layout in ("cache_slice", "head_slice") and shape[2] > 1:
        assert not tensor.is_contiguous()


@given(data=st.data())
def test_strided_views_keep_values(data):
    base = torch.randn(3, 4, 5)
    view = data.draw(pst.strided_views(base))
    assert torch.equal(view, base)
