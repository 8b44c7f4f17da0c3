"""Selection: the layout contract between policies and gather kernels."""

import pytest
import torch
from hypothesis import given, strategies as st

from proxykv.selection import Selection


@st.composite
def masks(draw):
    b, l, h, t = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                  draw(st.integers(1, 40)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    density = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return torch.rand(b, l, h, t, generator=generator) < density


@given(mask=masks())
def test_mask_round_trips_through_both_forms(mask):
    selection = Selection.from_mask(mask)
    selection.validate()
    assert torch.equal(selection.to_mask(), mask)
    ragged = selection.to_ragged()
    ragged.validate()
    assert ragged.is_ragged and torch.equal(ragged.to_mask(), mask)
    assert torch.equal(selection.counts(), mask.sum(-1))
    assert ragged.total_kept == int(mask.sum())


@given(mask=masks(), data=st.data())
def test_layer_view_matches_the_layer_of_the_mask(mask, data):
    selection = Selection.from_mask(mask).to_ragged()
    layer = data.draw(st.integers(0, mask.shape[1] - 1))
    view = selection.layer(layer)
    b, _, h, _ = mask.shape
    assert view.cu_seqlens.numel() == b * h + 1 and int(view.cu_seqlens[0]) == 0
    for batch in range(b):
        for head in range(h):
            s = batch * h + head
            kept = view.indices[view.cu_seqlens[s]:view.cu_seqlens[s + 1]].long()
            assert torch.equal(kept, mask[batch, layer, head].nonzero().flatten())


def test_equal_counts_give_a_uniform_selection():
    mask = torch.zeros(2, 1, 2, 6, dtype=torch.bool)
    mask[..., [1, 4]] = True
    selection = Selection.from_mask(mask)
    assert not selection.is_ragged and selection.indices.shape == (2, 1, 2, 2)
    assert selection.indices.dtype == torch.int32 and selection.budget == 2.0
    assert selection.layer(0).indices.tolist() == [[[1, 4], [1, 4]], [[1, 4], [1, 4]]]


def test_uniform_constructor_sorts_and_validate_catches_repeats():
    selection = Selection.uniform(torch.tensor([[[[5, 1, 3]]]]), seq_len=6)
    assert selection.indices.tolist() == [[[[1, 3, 5]]]]
    repeated = Selection.uniform(torch.tensor([[[[1, 1]]]]), seq_len=6)
    with pytest.raises(ValueError, match="strictly increasing within each head"):
        repeated.validate()
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        Selection.uniform(torch.tensor([[[[1, 6]]]]), seq_len=6).validate()
    with pytest.raises(ValueError, match=r"layer_index must be in \[0, 1\), got 1"):
        selection.layer(1)


def test_validate_checks_ragged_bounds_range_and_order():
    def ragged(indices, cu_seqlens, seq_len=6):
        return Selection(torch.tensor(indices, dtype=torch.int32),
                         torch.tensor(cu_seqlens, dtype=torch.int32), 1, 1, 2, seq_len, 1.0)

    ragged([1, 4, 0], [0, 2, 3]).validate()
    ragged([], [0, 0, 0]).validate()
    with pytest.raises(ValueError, match=r"rise monotonically from 0 to N=3: .*must start at 0"):
        ragged([1, 4, 0], [1, 2, 3]).validate()
    with pytest.raises(ValueError, match=r"rise monotonically from 0 to N=3: .*non-decreasing"):
        ragged([1, 4, 0], [0, 4, 3]).validate()
    with pytest.raises(ValueError, match=r"rise monotonically from 0 to N=3: .*must end at N"):
        ragged([1, 4, 0], [0, 2, 2]).validate()
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\), got values in \[0, 6\]"):
        ragged([1, 6, 0], [0, 2, 3]).validate()
    with pytest.raises(ValueError, match="strictly increasing within each head"):
        ragged([4, 1, 0], [0, 2, 3]).validate()
    with pytest.raises(ValueError, match="strictly increasing within each head"):
        ragged([0, 4, 1], [0, 0, 3]).validate()  # sorted across, not within, the last segment
